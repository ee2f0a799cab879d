"""Sphinx configuration for the cellformers documentation.

Build with ``sphinx-build -b html docs docs/_build/html``. The build works offline: links to
other projects' documentation (intersphinx) are only fetched when the environment variable
``CELLFORMERS_DOCS_INTERSPHINX=1`` is set.
"""

from __future__ import annotations

import os
from datetime import date
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as _version

# -- Project information -------------------------------------------------------------------------

project = "cellformers"
author = "cellformers developers"
copyright = f"{date.today().year}, {author}"

try:
    release = _version("cellformers")
except PackageNotFoundError:  # docs built from a source tree without installing the package
    release = "0.1.0"
version = ".".join(release.split(".")[:2])

# -- General configuration -----------------------------------------------------------------------

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
    "sphinx.ext.viewcode",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
master_doc = root_doc = "index"
templates_path = ["_templates"]
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store", "**.ipynb_checkpoints"]
nitpicky = False

# MyST
myst_enable_extensions = [
    "colon_fence",
    "deflist",
    "dollarmath",
    "fieldlist",
    "substitution",
]
myst_heading_anchors = 3

# -- autodoc / autosummary / napoleon ------------------------------------------------------------


def _keep_autosummary_going_on_import_errors() -> None:
    """Turn a crash of autosummary into a warning when a whole module fails to import.

    In recent Sphinx (seen with 9.0), when the *parent* module of an autosummary entry cannot be
    imported (for example while the package is half-written), ``generate_autosummary_docs`` lets
    an ``ImportExceptionGroup`` escape and the build aborts (compare sphinx-doc/sphinx#12660).
    Re-raising it
    as ``ImportError`` lets autosummary report "failed to import" and carry on. Names that are
    simply missing from an importable module are not affected. No-op if Sphinx internals differ.
    """
    try:
        from sphinx.ext.autosummary import ImportExceptionGroup
        from sphinx.ext.autosummary import generate as _generate
    except ImportError:  # pragma: no cover - older or newer Sphinx layout
        return
    original = getattr(_generate, "import_ivar_by_name", None)
    if original is None or getattr(original, "_cellformers_wrapped", False):
        return

    def import_ivar_by_name(*args, **kwargs):
        try:
            return original(*args, **kwargs)
        except ImportExceptionGroup as exc:
            raise ImportError(str(exc)) from exc

    import_ivar_by_name._cellformers_wrapped = True  # type: ignore[attr-defined]
    _generate.import_ivar_by_name = import_ivar_by_name


_keep_autosummary_going_on_import_errors()

autosummary_generate = True
autosummary_imported_members = True
autodoc_member_order = "groupwise"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_default_options = {
    "members": True,
    "show-inheritance": False,
}
# Heavy or optional imports that must not break the docs build when absent.
autodoc_mock_imports = ["flash_attn", "torchtext", "scgpt"]

napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_include_init_with_doc = False
napoleon_use_rtype = True
napoleon_use_param = True
# Render "Attributes" sections as a field list of the object they belong to (as scanpy does).
napoleon_use_ivar = True
napoleon_custom_sections = [("Params", "Parameters")]

# -- intersphinx ---------------------------------------------------------------------------------
# Offline by default: no inventory is fetched unless CELLFORMERS_DOCS_INTERSPHINX=1.

_INTERSPHINX = {
    "python": ("https://docs.python.org/3", None),
    "numpy": ("https://numpy.org/doc/stable/", None),
    "scipy": ("https://docs.scipy.org/doc/scipy/", None),
    "anndata": ("https://anndata.readthedocs.io/en/stable/", None),
    "scanpy": ("https://scanpy.readthedocs.io/en/stable/", None),
    "scvi-tools": ("https://docs.scvi-tools.org/en/stable/", None),
    "torch": ("https://docs.pytorch.org/docs/stable/", None),
    "lightning": ("https://lightning.ai/docs/pytorch/stable/", None),
}

if os.environ.get("CELLFORMERS_DOCS_INTERSPHINX", "") == "1":
    intersphinx_mapping = _INTERSPHINX
else:
    intersphinx_mapping = {}
intersphinx_timeout = 10
intersphinx_cache_limit = 7  # days
# Never resolve a bare :doc: or :std:label: against another project.
intersphinx_disabled_reftypes = ["std:doc", "std:label"]

# -- HTML output ---------------------------------------------------------------------------------

html_theme = "sphinx_book_theme"
html_title = "cellformers"
html_static_path = ["_static"]
html_show_sourcelink = False
html_theme_options = {
    "repository_url": "https://github.com/cellformers/cellformers",
    "repository_branch": "main",
    "path_to_docs": "docs",
    "use_repository_button": True,
    "use_issues_button": True,
    "use_edit_page_button": False,
    "navigation_with_keys": False,
}

# Warnings that are expected while parts of the API are still being written are kept visible
# (no -W in the build command); nothing is suppressed here on purpose.
suppress_warnings: list[str] = []


# -- Roles used in docstrings inherited from scvi-tools ------------------------------------------
# scvi-tools docstrings cite papers with sphinxcontrib-bibtex roles (:cite:p:`Key`). Without that
# extension, a tiny "cite" domain renders them as plain "[Key]" instead of raising errors.


def _plain_citation_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    """Render ``:cite:p:`Key``` as ``[Key]``."""
    from docutils import nodes

    return [nodes.Text(f"[{text}]")], []


def setup(app):
    """Register the citation fallbacks unless sphinxcontrib-bibtex is enabled."""
    if "sphinxcontrib.bibtex" in extensions:
        return
    from typing import ClassVar

    from sphinx.domains import Domain

    class _CiteFallbackDomain(Domain):
        name = "cite"
        label = "citations (plain-text fallback)"
        roles: ClassVar[dict] = {"p": _plain_citation_role, "t": _plain_citation_role}

        def merge_domaindata(self, docnames, otherdata):
            pass

        def resolve_any_xref(self, env, fromdocname, builder, target, node, contnode):
            return []

    app.add_domain(_CiteFallbackDomain)
    app.add_role("cite", _plain_citation_role, override=True)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
