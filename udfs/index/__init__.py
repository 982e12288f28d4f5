"""Index: kNN indices over a subset's CLIP embeddings: build, recall tuning and fallback, search.
layout.py is the files both sides agree on; build.py and tuning.py write them, search.py reads them.
"""
