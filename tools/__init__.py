"""Repository tools (artifact generators, checks): not part of the installed runtime."""
