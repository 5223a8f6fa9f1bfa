"""Merging: methods (pure tensor functions, registered), per-block parameters, live engine, export."""
