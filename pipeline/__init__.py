"""Tessera's command line and (as stages land) the Ray adapters that string the stages together."""
