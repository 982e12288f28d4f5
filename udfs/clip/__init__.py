"""CLIP: load a model (open_clip or a local folder), score image-text batches, write embeddings.
Model loading and devices, batch scoring of shard samples, the clip-retrieval embeddings layout.
"""
