"""`raro-fast <command> ...`: one entry point for the package's commands."""
from __future__ import annotations

import sys

COMMANDS = {
    "train": ("raro_fast.launch", "RARO training; with torchrun's options (--nproc_per_node=N ...) on several ranks"),
    "analyze": ("raro_fast.analyze", "support and entropy analysis of two or more models"),
    "evaluate": ("raro_fast.evaluate", "accuracy of n samples: first, mean, majority vote, critic tournament, pass@n"),
    "convert-gguf": ("raro_fast.model.gguf", "a GGUF file (or `smollm2`) to a Hugging Face directory for --model.path"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: raro-fast <command> [options]   (raro-fast <command> --help for its options)", ""]
        lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
        if argv and argv[0] not in ("-h", "--help"):  # a mistyped command: say so, not only the usage
            print(f"raro-fast: unknown command {argv[0]!r}\n" + "\n".join(lines), file=sys.stderr)
            return 2
        print("\n".join(lines))
        return 0
    import importlib

    return importlib.import_module(COMMANDS[argv[0]][0]).main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
