"""calibrate: see issue; thin until built."""
