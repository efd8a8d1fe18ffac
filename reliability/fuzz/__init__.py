"""Fuzzing Squall's untrusted-input parsers: the WebSocket frame parser, the
protocol decoders and the HTTP APIs. ``reliability/fuzz/README.md`` says how
to run it and what each property means; ``python -m reliability.fuzz``."""
