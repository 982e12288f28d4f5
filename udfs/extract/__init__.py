"""Extract: WAT/WARC records -> (image URL, alt-text) pairs, pure Python.
Record readers, the HTTP and charset layers, link rules (URLs, alt-text) and page-level opt-outs.
"""
