"""vhsmfs: the encrypted, chunked token store and its FUSE mount."""
