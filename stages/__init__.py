"""Pipeline stages as plain functions that run and are tested without Ray (DESIGN.md rule 7)."""
