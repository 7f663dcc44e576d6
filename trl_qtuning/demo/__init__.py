"""Embedded, fully offline demo: a tiny instruct model and math/QA data shipped inside pip wheels."""
