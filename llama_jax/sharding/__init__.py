"""Sharding: logical axis names (axes.py); the rules table and mesh helpers build on them."""
