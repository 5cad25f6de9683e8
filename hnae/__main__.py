"""``python -m hnae ...``: the command line lives in hnae_bench (the library never imports it otherwise)."""
if __name__ == "__main__":
    from hnae_bench.cli import main

    raise SystemExit(main())
