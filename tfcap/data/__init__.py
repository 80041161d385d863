"""Data files shipped with tfcap (each says where it comes from)."""
