"""Image dedup: exact (sha256), near (pHash) and semantic (CLIP embedding) duplicates, eval overlap.
Which row of a duplicate group is kept and why; banding, union-find, SemDeDup and the eval set.
"""
