"""cram_ray."""
