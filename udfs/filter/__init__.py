"""Filter: which scored pairs go into which LAION subset, and why the others do not.
Caption language id, the NSFW/watermark heads over CLIP embeddings, subset rules and embedding parts.
"""
