"""Engines: how instructions reach clients (in-process simulation, Flower)."""
