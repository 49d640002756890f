"""``kvcompress-vllm`` console script.

    kvcompress-vllm prepare-model     # download + convert the default model, print its path
    kvcompress-vllm model-path        # print the path (no download)
    kvcompress-vllm vllm ARGS...      # run vLLM's CLI (e.g. `serve`, `bench`) with the plugin
    kvcompress-vllm check             # start-up self-check against the installed vLLM
"""

from __future__ import annotations

import argparse
import sys


def _run_vllm(argv: list[str]) -> int:
    from vllm.entrypoints.cli.main import main as vllm_main

    import kvcompress_vllm  # noqa: F401  (version fallback + engine-args hook)

    sys.argv = ["vllm", *argv]
    vllm_main()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["vllm"]:
        return _run_vllm(argv[1:])
    parser = argparse.ArgumentParser(prog="kvcompress-vllm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare-model", help="download and convert the default model")
    prep.add_argument("--force", action="store_true", help="rebuild even if present")
    sub.add_parser("model-path", help="print where the default model lives")
    sub.add_parser("vllm", help="run vLLM's CLI with the plugin (e.g. `vllm serve ...`)")
    sub.add_parser("check", help="verify the installed vLLM matches what the plugin expects")
    args = parser.parse_args(argv)
    from kvcompress_vllm import model

    if args.command == "prepare-model":
        print(model.prepare_default_model(force=args.force))
    elif args.command == "model-path":
        print(model.default_model_path())
    elif args.command == "check":
        from kvcompress_vllm import compat

        compat.check_engine_hooks()
        compat.check_runtime_hooks()
        print(f"OK: vLLM {compat.installed_vllm_version()} matches kvcompress-vllm's hooks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
