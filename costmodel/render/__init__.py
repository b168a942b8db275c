"""Render: every table, CSV, Markdown, JSON and plot; unit formatting lives here only."""
