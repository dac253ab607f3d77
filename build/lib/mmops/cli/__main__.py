"""`python -m mmops.cli` works like `mmops`."""

from mmops.cli import app

app(prog_name="mmops")
