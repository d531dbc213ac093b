"""Data pipeline. Import from the submodules; this file stays empty so `python -m data.prepare` and its tokenizer
worker processes do not pay for importing torch and megatron-core.

    data.tokenizer  load_tokenizer, ByteTokenizer, HFTokenizer, train_bpe, check_vocab
    data.prepare    prepare() and the `python -m data.prepare` command: raw text -> PREFIX.bin/.idx/.manifest.json
    data.dataset    build_datasets, make_loader, ensure_sample, resolve_prefixes
    data.checks     validation of prepared data (used by build_datasets)
"""
