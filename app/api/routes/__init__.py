"""Example routes."""
