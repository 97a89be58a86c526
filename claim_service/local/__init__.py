"""Tooling for laptops and CI, never production paths: embedded Valkey and PostgreSQL, the
release demo and the partner simulator.

May import anything but ``cli``; only ``cli`` imports it.
"""
