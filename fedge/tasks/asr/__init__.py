"""On-device streaming speech: log-mel features, synthetic espeak-ng speakers, a chunked
streaming transformer with folding attention and CTC, an energy model, and the `asr` and
`kws` tasks."""
