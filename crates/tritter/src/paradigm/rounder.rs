//! See [`super`]; filled in by the paradigm work (issue 12).
