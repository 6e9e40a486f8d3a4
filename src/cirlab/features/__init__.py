"""Image features under a frozen backbone and their on-disk cache (what composers, training stages
and indexes read, each image encoded once per image tower and preprocessing)."""
