"""Chapter registration's files (see :mod:`regdiff_core.store`)."""

from __future__ import annotations
