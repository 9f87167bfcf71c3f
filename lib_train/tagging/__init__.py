"""Captions made and curated: the WD14 tagger, tagging runs over a project, caption editing, feature tags."""
