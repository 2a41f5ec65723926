"""Types, config, errors and helpers shared by every module. Imports nothing else of ours."""
