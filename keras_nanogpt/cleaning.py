"""Cleaning text for training: a byte-order mark, CRLF line endings, and Project Gutenberg headers and
licence footers, for a whole text (`clean_text`, what `kn.data.load_text` applies) or for one piece of a
document that `kn.data.prepare` reads in pieces (`clean_piece`).

Example:
    >>> clean_text("\\ufeffhi\\r\\nthere\\r\\n")
    'hi\\nthere\\n'
"""

import re

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THIS|THE) PROJECT GUTENBERG.*$", re.MULTILINE)
_PRODUCED_BY = re.compile(r"^Produced by[^\n]*(\n[^\n]+)*\n+")
_END_OF_EBOOK = re.compile(r"\n+End of (the )?Project Gutenberg[^\n]*$", re.IGNORECASE)


def clean_text(text):
    """Drop a BOM and Project Gutenberg headers/footers, and turn CRLF/CR line endings into LF.

    A file of several Gutenberg books keeps every book: the text between each START marker and the
    END marker after it, books separated by a blank line (the licences and headers between them go).

    Args:
        text: the raw text.

    Example:
        >>> clean_text("\\ufeffhi\\r\\nthere\\r\\n")
        'hi\\nthere\\n'
    """
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    starts = list(_GUTENBERG_START.finditer(text))
    ends = list(_GUTENBERG_END.finditer(text))
    if not starts and not ends:
        return text
    if not starts:
        return _book(text[:ends[0].start()])
    books = []
    for index, start in enumerate(starts):
        limit = starts[index + 1].start() if index + 1 < len(starts) else len(text)
        end = next((e.start() for e in ends if start.end() <= e.start() < limit), limit)
        books.append(_book(text[start.end():end]))
    return "\n".join(book for book in books if book.strip()) or "\n"


def _book(text):
    """One book's text without its "Produced by" credit and "End of Project Gutenberg" line."""
    text = _PRODUCED_BY.sub("", text.strip())
    return _END_OF_EBOOK.sub("", text).strip() + "\n"


def clean_piece(text, first, last, footer):
    """`clean_text` for one piece of a document: the header goes with the first piece; the last one ends
    where the licence footer began (`footer`: it was cut off when the pieces were planned).

    Args:
        text: the piece.
        first, last: whether it is its document's first / last piece.
        footer: whether the document's licence footer was cut off after this piece.

    Example:
        >>> clean_piece("\\ufeffa\\r\\nb", first=True, last=False, footer=False)
        'a\\nb'
    """
    if first and last and not footer:
        return clean_text(text)
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if first:
        text = text.lstrip("\ufeff")
        start = _GUTENBERG_START.search(text)
        if start:
            text = _PRODUCED_BY.sub("", text[start.end():].lstrip())
    if last and footer:
        text = _END_OF_EBOOK.sub("", text.rstrip()).rstrip() + "\n"
    return text
