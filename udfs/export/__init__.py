"""Export: a subset as training shards, pure Python. Locate each row's image in its download tar,
place rows in shards by a seeded order, copy the images (never re-encoded) and write the markers.
"""
