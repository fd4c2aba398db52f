"""The guest side (``agent``, copied into images) and the host side (``client``) of job execution."""
