"""validation: see issue; thin until built."""
