"""Rendering only: self-contained HTML pages (html) and the figures in them (plots)."""
