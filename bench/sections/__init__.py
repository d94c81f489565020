"""The bench sections, one module each; benchkit.SECTION_MODULES lists them in order."""
