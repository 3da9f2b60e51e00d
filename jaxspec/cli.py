"""The ``jaxspec`` command line: generate, compress-prompt, trigram, methods, convert, plan, inspect, fetch."""

from __future__ import annotations

import argparse
import json
import signal
import sys

def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean bad input: printed as one line, exit code 2, no traceback."""
    from jaxspec.api import InputError
    from jaxspec.conversion.checkpoint import CheckpointFormatError
    from jaxspec.conversion.hf import CheckpointError
    from jaxspec.fetch import FetchError
    from jaxspec.models.config import ConfigError

    errors: list[type[BaseException]] = [InputError, CheckpointFormatError, CheckpointError, FetchError,
                                         ConfigError, FileNotFoundError]
    for mod, name in (("jaxspec.conversion.gguf", "GGUFError"), ("jaxspec.conversion.tokenizer", "TokenizerError"),
                      ("jaxspec.sharding", "ShardingError"), ("jaxspec.drafters.trigram", "TrigramTableError")):
        try:
            errors.append(getattr(__import__(mod, fromlist=[name]), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError as e:
        from jaxspec.api import InputError

        raise InputError(f"--prompt-ids must be comma-separated integers, got {text!r}") from e


def cmd_generate(args) -> int:
    import jax

    import jaxspec
    from jaxspec.api import InputError
    from jaxspec.sharding import ShardingRules, mesh_from_args

    if (args.prompt is None) == (args.prompt_ids is None):
        raise InputError("give exactly one of --prompt and --prompt-ids")
    prompt = args.prompt if args.prompt is not None else _parse_ids(args.prompt_ids)
    kv = _kv_method(args)
    pc = _pc_method(args)
    speculative = _drafter(args)  # before loading the model: a bad table file fails fast
    mesh = mesh_from_args(args)
    model = jaxspec.load(args.model, dtype=args.dtype, quiet=args.json, mesh=mesh)
    draft = (jaxspec.load(args.draft, dtype=args.dtype, quiet=args.json, mesh=mesh,
                          rules=None if mesh is None else ShardingRules.replicated()) if args.draft else None)
    res = jaxspec.generate(
        model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, seed=args.seed, chat=args.chat,
        stop_ids=_parse_ids(args.stop_ids) if args.stop_ids is not None else None,
        cache_capacity=args.cache_capacity, kv=kv, draft=draft, kept_indices=args.kept_indices,
        speculative=speculative, pc=pc,
    )
    if jax.process_index() > 0:  # multi-host: every process computed the same result; process 0 prints it
        return 0
    if args.json:
        print(json.dumps(res.to_json()))
    else:
        print(res.text if res.text is not None else " ".join(map(str, res.token_ids)))
        t = res.timings
        print(f"[{len(res.token_ids)} tokens, finish={res.finish_reason}, prompt={res.prompt_tokens} tokens, "
              f"load {t['load']:.2f}s, compile {t['compile']:.2f}s, prefill {t['prefill']:.3f}s, "
              f"decode {res.tokens_per_second:.1f} tok/s]", file=sys.stderr)
        if res.pc is not None:
            print(f"[pc {res.pc['method']}: {res.pc['tokens_in']} -> {res.pc['tokens_out']} prompt tokens, "
                  f"draft {res.pc['draft_seconds']:.3f}s]", file=sys.stderr)
    return 0


def _drafter(args):
    """The --speculative drafter with its flags (--tree-size; for aded --trigram, --aded-value, --no-adapt)."""
    from jaxspec.api import InputError

    aded_flags = [f for f, v in (("--trigram", args.trigram), ("--aded-value", args.aded_value),
                                 ("--no-adapt", args.no_adapt)) if v]
    if not args.speculative:
        flags = (["--tree-size"] if args.tree_size is not None else []) + aded_flags
        if flags:
            raise InputError(f"{', '.join(flags)} needs --speculative")
        return None
    from jaxspec.drafters import make_drafter

    options = {}
    if args.speculative == "aded":
        if args.trigram is None:
            raise InputError("--speculative aded needs --trigram FILE (make one with `jaxspec trigram build`)")
        from jaxspec.drafters.trigram import TrigramTable

        options = dict(table=TrigramTable.load(args.trigram), value=args.aded_value or "released",
                       adapt=not args.no_adapt)
    elif aded_flags:
        raise InputError(f"{', '.join(aded_flags)} apply to --speculative aded only")
    try:
        return make_drafter(args.speculative, tree_size=args.tree_size, **options)
    except ValueError as e:
        raise InputError(str(e)) from e


def _tokenizer_and_vocab(name: str):
    """The model's tokenizer and vocabulary size without reading its weights (GGUF: header only)."""
    from pathlib import Path

    from jaxspec.api import InputError, _maybe_tokenizer
    from jaxspec.conversion import checkpoint
    from jaxspec.fetch import resolve_model
    from jaxspec.models.config import ModelConfig

    path = Path(resolve_model(name, quiet=True))
    if path.is_file():
        from jaxspec.conversion.gguf import GGUFFile, config_from_gguf
        from jaxspec.conversion.tokenizer import tokenizer_from_gguf

        f = GGUFFile(path)
        return tokenizer_from_gguf(f.metadata), config_from_gguf(f.metadata, f.tensors).vocab_size
    if checkpoint.is_checkpoint(path):
        tok, cfg = _maybe_tokenizer(path / "tokenizer"), checkpoint.load_checkpoint_config(path)
    else:
        tok, cfg = _maybe_tokenizer(path), ModelConfig.from_hf_config(path)
    if tok is None:
        raise InputError(f"{path} has no tokenizer: the tri-gram table must be built with the target's tokenizer")
    return tok, cfg.vocab_size


def cmd_trigram_build(args) -> int:
    import glob
    import os

    from jaxspec.api import InputError
    from jaxspec.drafters.trigram import build_from_files

    if args.top_k < 1:
        raise InputError(f"--top-k must be >= 1, got {args.top_k}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        raise InputError(f"--out {args.out!r}: no such directory")
    files = []
    for pattern in args.input:
        matched = sorted(p for p in glob.glob(os.path.expanduser(pattern), recursive=True) if os.path.isfile(p))
        if not matched:
            raise InputError(f"--input {pattern!r} matches no file")
        files += matched
    files = list(dict.fromkeys(files))
    tokenizer, vocab_size = _tokenizer_and_vocab(args.model)
    table, summary = build_from_files(files, tokenizer, vocab_size, top_k=args.top_k, progress=not args.quiet)
    table.save(args.out)
    summary = {"out": args.out, "vocab_size": vocab_size, "top_k": args.top_k, **summary}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"{args.out}: {summary['contexts']} contexts from {summary['tokens']} tokens in {summary['files']} "
              f"files ({summary['skipped']} not UTF-8, skipped), {summary['seconds']:.1f}s")
    return 0


KV_PARAMS = {  # CLI flag (dest) -> (type, help); each is a field of some jaxspec.kv method
    "capacity": (int, "KV entries kept per layer and kv head (max_capacity_prompt)"),
    "window_size": (int, "recent prompt entries always kept (and SnapKV's observation window)"),
    "kernel_size": (int, "pooling kernel along keys (odd)"),
    "pool_type": (str, "pooling: max or mean"),
    "reduction_type": (str, "reduction over the GQA group and the window queries: max, mean (or sum)"),
    "lookahead_tokens": (int, "SpecKV lookahead length (default: --max-new-tokens)"),
    "prefill_window_size": (int, "SpecKV sparse-prefill band (capacity must be <= band + vertical)"),
    "prefill_vertical_size": (int, "SpecKV sparse-prefill vertical columns"),
    "beta": (int, "PyramidKV: smallest layer budget = budget // beta"),
    "floor_alpha": (float, "AdaKV: share of each head's budget guaranteed"),
    "sink_size": (int, "StreamingLLM: attention-sink tokens kept at the start"),
}


def _kv_method(args):
    """The --kv method with the KV flags given on the command line (others keep the method's defaults)."""
    from jaxspec.api import InputError

    params = {k: getattr(args, k) for k in KV_PARAMS if getattr(args, k) is not None}
    if args.kv is None:
        if params or (args.kept_indices and args.pc is None):
            raise InputError(f"--{', --'.join(k.replace('_', '-') for k in params) or 'kept-indices'} needs --kv")
        return None
    from jaxspec.kv import make_method

    return make_method(args.kv, **params)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


PC_PARAMS = {  # field of some jaxspec.pc method -> (type, help); the CLI flag is --pc-FIELD
    "capacity": (int, "prompt tokens kept (max_capacity_prompt)"),
    "window_size": (int, "last prompt tokens always kept (SpecPC: also its query window)"),
    "kernel_size": (int, "SpecPC pooling kernel"),
    "neighbor_tokens": (int, "SpecPC neighbourhood kept around each seed (default: kernel size)"),
    "pool_type": (str, "SpecPC pooling: max or mean"),
    "reduction_type": (str, "SpecPC reduction over heads, rows, layers, steps: max or mean (a sum)"),
    "lookahead_tokens": (int, "draft tokens written (SpecPC, SpecPrefill)"),
    "starting_layer_index": (int, "SpecPC: first draft layer whose attention counts"),
    "weighted_query": (_bool, "SpecPC: weight the window queries 0 -> 1 (true/false)"),
    "chunk_size": (int, "SpecPrefill: tokens per averaged chunk"),
    "seed": (int, "random: seed"),
}


def _pc_method(args):
    """The --pc method with the --pc-* flags given on the command line (others keep the method's defaults)."""
    from jaxspec.api import InputError

    params = {k: getattr(args, f"pc_{k}") for k in PC_PARAMS if getattr(args, f"pc_{k}") is not None}
    if args.pc is None:
        if params:
            raise InputError(f"--pc-{', --pc-'.join(k.replace('_', '-') for k in params)} needs --pc")
        return None
    from jaxspec.pc import make_method

    return make_method(args.pc, **params)


def _add_pc_flags(group) -> None:
    for name, (typ, text) in PC_PARAMS.items():
        group.add_argument(f"--pc-{name.replace('_', '-')}", dest=f"pc_{name}", type=typ, help=text)


def cmd_compress_prompt(args) -> int:
    import jaxspec
    from jaxspec.api import InputError, prepare_request
    from jaxspec.pc import accounting, compress

    if (args.prompt is None) == (args.prompt_ids is None):
        raise InputError("give exactly one of --prompt and --prompt-ids")
    pc = _pc_method(args)
    model = jaxspec.load(args.model, dtype=args.dtype, quiet=args.json)
    req = prepare_request(model, args.prompt if args.prompt is not None else _parse_ids(args.prompt_ids), 1,
                          args.chat, None, None)
    c = compress(req.ids, pc, draft=model if pc.needs_draft else None, stop_ids=req.stop_ids)
    ids = c.prompts[0]
    text = model.tokenizer.decode(ids, skip_special_tokens=False) if model.tokenizer is not None else None
    if args.json:
        print(json.dumps({"text": text, "token_ids": ids, "pc": accounting(c, 0, args.kept_indices)}))
    else:
        print(text if text is not None else " ".join(map(str, ids)))
        acc = accounting(c, 0)
        print(f"[pc {pc.name}: {acc['tokens_in']} -> {acc['tokens_out']} tokens, draft {acc['draft_seconds']:.3f}s"
              + (f", {acc['note']}" if "note" in acc else "") + "]", file=sys.stderr)
    return 0


def cmd_methods(args) -> int:
    from jaxspec import drafters, kv, pc

    sections = {"kv": ("KV-cache compression (--kv)", kv.describe()),
                "pc": ("Prompt compression (--pc)", pc.describe()),
                "speculative": ("Speculative decoding drafters (--speculative)", drafters.describe())}
    if args.json:
        print(json.dumps({key: methods for key, (_, methods) in sections.items()}, indent=2))
        return 0
    for title, methods in sections.values():
        print(title)
        for m in methods:
            print(f"  {m['name']:<14} {m['summary']}" + ("  [needs --draft]" if m["needs_draft"] else ""))
            for k, v in m["params"].items():
                print(f"      {k:<24} default {v}")
        print()
    return 0


def cmd_convert(args) -> int:
    import jaxspec
    from jaxspec.conversion.checkpoint import save_checkpoint
    from jaxspec.conversion.hf import save_hf

    model = jaxspec.load(args.src, dtype=args.dtype)
    if args.to == "hf":
        out = save_hf(model.config, model.params, args.out, tokenizer=model.tokenizer)
    else:
        out = save_checkpoint(args.out, model.config, model.params, tokenizer=model.tokenizer, source=model.source)
    print(out)
    return 0


def cmd_plan(args) -> int:
    from jaxspec.plan import main

    return main(args)


def cmd_inspect(args) -> int:
    from jaxspec.conversion.inspect import inspect_path

    info = inspect_path(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"format: {info['format']}")
    for k, v in info.get("config", {}).items():
        print(f"  {k}: {v}")
    print(f"tensors: {len(info['tensors'])}")
    for t in info["tensors"]:
        print(f"  {t['name']:<56} {t['dtype']:<8} {tuple(t['shape'])}")
    return 0


def cmd_fetch(args) -> int:
    from jaxspec import fetch

    if args.list or not args.name:
        for name in fetch.list_registry():
            e = fetch.REGISTRY[name]
            print(f"{name:<32} {e.description}")
        return 0
    print(fetch.fetch(args.name, quiet=args.quiet, verify=args.verify))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxspec", description="Draft-guided LLM inference in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text with a model",
                       description="Generate a continuation. MODEL is an HF directory, a GGUF file, a "
                                   "`jaxspec convert` checkpoint or a registry name (see `jaxspec fetch --list`).")
    g.add_argument("--model", required=True, help="model path or registry name")
    g.add_argument("--prompt", help="prompt text")
    g.add_argument("--prompt-ids", help="prompt as comma-separated token ids, e.g. 1,2,3")
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    g.add_argument("--top-k", type=int, default=0, help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, help="1.0 = off")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--stop-ids", help="comma-separated stop token ids (default: the model's EOS ids)")
    g.add_argument("--cache-capacity", type=int, help="KV cache slots (default: prompt + max new tokens)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    k = g.add_argument_group("KV-cache compression", "see `jaxspec methods`; unset flags keep the method's defaults")
    k.add_argument("--kv", metavar="METHOD", help="compress the prompt's KV cache with METHOD")
    k.add_argument("--draft", help="draft model (path or registry name) for methods that need one "
                                   "(speckv; --pc specpc, specprefill, draft-ppl; --speculative draft-model)")
    k.add_argument("--kept-indices", action="store_true",
                   help="add kv.kept_indices[layer][kv_head] (with --kv) and pc.kept_indices (with --pc) to --json")
    for name, (typ, text) in KV_PARAMS.items():
        flags = [f"--{name.replace('_', '-')}"] + (["--window"] if name == "window_size" else [])
        k.add_argument(*flags, dest=name, type=typ, help=text)
    pg = g.add_argument_group("prompt compression", "see `jaxspec compress-prompt`; runs before --kv (SpecPC then "
                                                    "SpecKV reuses the draft's lookahead: SpecKV-PC)")
    pg.add_argument("--pc", metavar="METHOD", help="compress the prompt with METHOD: specpc, specprefill, "
                                                   "draft-ppl, recency, random")
    _add_pc_flags(pg)
    sp = g.add_argument_group("speculative decoding", "lossless: greedy output equals plain greedy decoding")
    sp.add_argument("--speculative", choices=["aded", "ngram", "draft-model"],
                    help="drafter (draft-model needs --draft, aded --trigram)")
    sp.add_argument("--tree-size", type=int, help="draft nodes verified per target forward, root included "
                                                  "(default: the drafter's; aded: 65)")
    sp.add_argument("--trigram", metavar="FILE", help="aded: tri-gram table from `jaxspec trigram build`")
    sp.add_argument("--aded-value", choices=["released", "intended"],
                    help="aded MCTS value: the reference code's (released, default) or the true trigram weights")
    sp.add_argument("--no-adapt", action="store_true", help="aded: no adaptive table update while decoding")
    s = g.add_argument_group("sharding", "see docs/sharding.md")
    s.add_argument("--mesh", help="device mesh, e.g. data=2,model=4 (default with several devices: all of a host's "
                                  "devices on model, hosts on data)")
    s.add_argument("--distributed", action="store_true",
                   help="initialise jax.distributed (multi-host) from the flags below, else JAX_COORDINATOR_ADDRESS, "
                        "JAX_NUM_PROCESSES, JAX_PROCESS_ID, else cluster auto-detection (TPU pod slices)")
    s.add_argument("--coordinator", help="host:port of process 0 (with --distributed)")
    s.add_argument("--num-processes", type=int, help="number of processes (with --distributed)")
    s.add_argument("--process-id", type=int, help="this process's index (with --distributed)")
    g.set_defaults(func=cmd_generate)

    cp = sub.add_parser("compress-prompt", help="compress a prompt with a draft model and print the compressed text",
                        description="Print the prompt that `generate --pc METHOD` hands the target.")
    cp.add_argument("--model", required=True, help="the draft model (path or registry name); for methods without "
                                                   "a draft, any model with the target's tokenizer")
    cp.add_argument("--prompt", help="prompt text")
    cp.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    cp.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    cp.add_argument("--pc", metavar="METHOD", required=True, help="specpc, specprefill, draft-ppl, recency, random")
    _add_pc_flags(cp)
    cp.add_argument("--kept-indices", action="store_true", help="add pc.kept_indices to --json")
    cp.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32")
    cp.add_argument("--json", action="store_true", help="print one JSON object: text, token_ids, pc")
    cp.set_defaults(func=cmd_compress_prompt)

    tg = sub.add_parser("trigram", help="ADED tri-gram tables")
    tsub = tg.add_subparsers(dest="trigram_command", required=True)
    tb = tsub.add_parser("build", help="count the trigrams of text files tokenised with a model's tokenizer",
                         description="Build an ADED tri-gram table (top-K successors per context) from text files "
                                     "tokenised with the target model's tokenizer; only the tokenizer is loaded.")
    tb.add_argument("--model", required=True, help="the target model (path or registry name) whose tokenizer to use")
    tb.add_argument("--input", nargs="+", required=True, metavar="GLOB",
                    help="text files or glob patterns (** recurses), e.g. 'corpus/**/*.py'; one text per file")
    tb.add_argument("--out", required=True, help="output .npz file (written atomically)")
    tb.add_argument("--top-k", type=int, default=12, help="successors kept per context (default 12)")
    tb.add_argument("--quiet", action="store_true", help="no progress bar")
    tb.add_argument("--json", action="store_true", help="print one JSON summary: contexts, tokens, files, seconds")
    tb.set_defaults(func=cmd_trigram_build)

    m = sub.add_parser("methods", help="list the KV, prompt-compression and speculative methods with parameters")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_methods)

    c = sub.add_parser("convert", help="convert a model to an orbax checkpoint (or an HF directory)")
    c.add_argument("src", help="HF directory, GGUF file, checkpoint or registry name")
    c.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    c.add_argument("--to", choices=["orbax", "hf"], default="orbax")
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    c.set_defaults(func=cmd_convert)

    pl = sub.add_parser("plan", help="memory per device for a model, batch, context and mesh (reads no weights)",
                        description="Bytes per device of params, KV cache (full and compressed) and activations, "
                                    "split by the sharding rules jaxspec uses, and whether they fit a device.")
    pl.add_argument("--model", required=True, help="HF directory, GGUF file, checkpoint or fetched registry name")
    pl.add_argument("--draft", help="draft model (replicated on every device)")
    pl.add_argument("--context", type=int, required=True, help="prompt tokens per row")
    pl.add_argument("--new-tokens", type=int, default=0, help="generated tokens per row (default 0)")
    pl.add_argument("--batch", type=int, default=1)
    pl.add_argument("--kv", metavar="METHOD", help="KV-compression method (see `jaxspec methods`)")
    pl.add_argument("--capacity", type=int, help="entries the KV method keeps per layer and kv head")
    pl.add_argument("--mesh", help="e.g. data=2,model=4 (default: one device)")
    pl.add_argument("--device-memory", help="memory per device, e.g. 16GiB (TPU v5e), 80GB")
    pl.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default float32")
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(func=cmd_plan)

    i = sub.add_parser("inspect", help="list tensors, shapes, dtypes and config of a checkpoint")
    i.add_argument("path")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    f = sub.add_parser("fetch", help="download and verify a registry model or data set")
    f.add_argument("name", nargs="?")
    f.add_argument("--list", action="store_true", help="list the registry")
    f.add_argument("--verify", action="store_true", help="re-hash a cached file")
    f.add_argument("--quiet", action="store_true")
    f.set_defaults(func=cmd_fetch)
    return p


def main(argv: list[str] | None = None) -> int:
    if hasattr(signal, "SIGPIPE"):  # `jaxspec inspect ... | head` ends quietly
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def entry() -> int:
    """The ``jaxspec`` console script: ``main`` with the persistent compilation cache on
    (``jaxspec.fetch.use_compile_cache``)."""
    from jaxspec.fetch import use_compile_cache

    use_compile_cache()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
