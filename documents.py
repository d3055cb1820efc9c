"""Documents as text for the model: PDF (pypdf), DOCX (python-docx) and text files (txt, md,
csv, json, source code), read within limits and marked with the file's name (and page numbers
for a PDF). What a file is comes from its content, never its name. No torch, no Gradio. The
chat and /v1 read them through attachments.py; the engine cuts a document that doesn't fit
its context (model_runner.ModelRunner._fit_documents, by tokens).

    document = read_document(data, "report.pdf")    # DocumentError: one line for the user
    document.text          # "[report.pdf, page 1]\\n...\\n\\n[report.pdf, page 2]\\n..."
    document.notes         # what the reader should know ("no text layer: a scan?")
    document.page_images   # a scan's first pages, as pictures
"""

from __future__ import annotations

import io
import re
import time
import zipfile
from dataclasses import dataclass, field

MAX_DOCUMENT_BYTES = 20 * 1024 * 1024   # a larger file is refused before it is parsed
MAX_PDF_PAGES = 500                     # a PDF with more pages is refused (say which pages to send)
MAX_SCANNED_PAGES = 8                   # a PDF without text: its first pages' pictures, for a vision model
MAX_DOCUMENT_CHARS = 2_000_000          # text beyond this is not extracted (the context is smaller anyway)
MAX_DOCX_UNPACKED_BYTES = 200 * 1024 * 1024  # a DOCX that unpacks to more is a zip bomb
MAX_DOCX_RATIO = 200                    # ... as is one member compressed more than this
MAX_DOCX_BODY_BYTES = 25 * 1024 * 1024  # its text's XML: python-docx holds it all as a tree (~20x in memory)
MAX_READ_SECONDS = 20                   # a PDF's pages are read until then; the note says where it stopped
MAX_SCAN_SIDE = 2048                    # a scan's page pictures are downscaled to this, kept decoded
TEXT_KINDS = ("txt", "md", "markdown", "csv", "tsv", "json", "jsonl", "yaml", "yml", "toml", "xml", "html", "htm",
              "log", "ini", "cfg", "py", "js", "ts", "tsx", "jsx", "java", "c", "h", "cpp", "hpp", "cc", "rs", "go",
              "rb", "php", "sh", "bash", "sql", "swift", "kt", "scala", "r", "m", "tex", "rst", "css", "scss")


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # a log's colours, not for the model


class DocumentError(ValueError):
    """A document this app can't read: one line saying why, for the chat or a 400.
    `lasting` False: the memory ran out (another try, less busy, may read it)."""

    def __init__(self, message: str, *, lasting: bool = True):
        super().__init__(message)
        self.lasting = lasting


@dataclass
class Document:
    name: str
    kind: str            # "pdf" | "docx" | "text"
    text: str            # the whole text, marked with the name (and pages)
    pages: int = 0       # a PDF's pages
    notes: list[str] = field(default_factory=list)
    page_images: list = field(default_factory=list)  # a scan's pages: (number, PIL image)


def kind_of(data: bytes, name: str) -> str:
    """What the content is: pdf, docx or text; DocumentError for anything else, and for a
    file whose content is not what its name says."""
    suffix = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if data.startswith(b"%PDF-"):
        kind = "pdf"
    elif data.startswith(b"PK\x03\x04") and _zip_member(data, "word/document.xml"):
        kind = "docx"
    elif _text_of(data) is not None:
        kind = "text"
    elif data.startswith(b"PK\x03\x04") and suffix == "docx":  # (a zip, but not one that opens)
        raise DocumentError(f"{name} is not a readable DOCX (a damaged archive).")
    else:
        raise DocumentError(f"{name} is not a document this app reads (PDF, DOCX or a text file).")
    expected = {"pdf": "pdf", "docx": "docx"}.get(suffix, "text" if suffix in TEXT_KINDS else None)
    if expected is not None and expected != kind:
        said = {"pdf": "a PDF", "docx": "a DOCX", "text": "text"}
        raise DocumentError(f"{name} is not what its name says: its content is {said[kind]}, not {said[expected]}.")
    return kind


def read_document(data: bytes, name: str) -> Document:
    """A document's text, marked with its name, within the limits above."""
    if not data:
        raise DocumentError(f"{name} is empty.")
    if len(data) > MAX_DOCUMENT_BYTES:
        raise DocumentError(f"{name} is {len(data) / 2**20:.0f} MB; the most this app reads is "
                            f"{MAX_DOCUMENT_BYTES // 2**20} MB.")
    kind = kind_of(data, name)
    if kind == "pdf":
        return _read_pdf(data, name)
    if kind == "docx":
        return _read_docx(data, name)
    text = _text_of(data)
    notes = []
    if len(text) > MAX_DOCUMENT_CHARS:
        text, notes = text[:MAX_DOCUMENT_CHARS], [f"Only the first {MAX_DOCUMENT_CHARS:,} characters of {name} "
                                                  f"were read."]
    return Document(name, "text", f"[{name}]\n{text}", notes=notes)


def _read_pdf(data: bytes, name: str) -> Document:
    import pypdf
    from pypdf.errors import PdfReadError
    try:
        reader = pypdf.PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise DocumentError(f"{name} is encrypted (password-protected): save it without a password and send it again.")
        pages = len(reader.pages)
        if pages > MAX_PDF_PAGES:
            raise DocumentError(f"{name} has {pages:,} pages; the most this app reads is {MAX_PDF_PAGES}: send "
                                f"the pages you need as a smaller PDF.")
        texts, total, read, started = [], 0, 0, time.monotonic()
        for number, page in enumerate(reader.pages, 1):
            text = (page.extract_text() or "").strip()[:MAX_DOCUMENT_CHARS - total]
            read = number
            if text:
                texts.append(f"[{name}, page {number}]\n{text}")
                total += len(text)
            if total >= MAX_DOCUMENT_CHARS or time.monotonic() - started > MAX_READ_SECONDS:
                break
    except DocumentError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, OSError, RecursionError) as error:
        raise DocumentError(f"{name} is not a readable PDF ({type(error).__name__}: {str(error)[:120]}).") from None
    except Exception as error:  # (pypdf's own failures on damaged files, e.g. its dependency's errors)
        raise DocumentError(f"{name} is not a readable PDF ({type(error).__name__}).",
                            lasting=not isinstance(error, MemoryError)) from None
    notes = []
    if read < pages or total >= MAX_DOCUMENT_CHARS:
        why = f"{MAX_DOCUMENT_CHARS:,} characters" if total >= MAX_DOCUMENT_CHARS else f"{MAX_READ_SECONDS} s"
        notes.append(f"Only the first {read} of {pages} pages of {name} were read (the most this app reads is {why}).")
    page_images = [] if texts else _scanned_pages(reader)
    if not texts:
        notes.append(f"{name} has no text layer (a scan?): the model gets no text from it" +
                     (f"; a model that sees images gets its first {len(page_images)} pages as pictures." if page_images
                      else "."))
    return Document(name, "pdf", "\n\n".join(texts), pages=pages, notes=notes, page_images=page_images)


def _scanned_pages(reader) -> list:
    """The largest picture on each of a scan's first pages: (page number, PIL image)."""
    pictures = []
    for number, page in enumerate(reader.pages[:MAX_SCANNED_PAGES], 1):
        try:
            images = [image.image for image in page.images if image.image is not None]
        except Exception:  # (a damaged picture, or too large to decode: that page gives none)
            continue
        if images:
            picture = max(images, key=lambda image: image.width * image.height).convert("RGB")
            picture.thumbnail((MAX_SCAN_SIDE, MAX_SCAN_SIDE))
            pictures.append((number, picture))
    return pictures


def _read_docx(data: bytes, name: str) -> Document:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = archive.infolist()
            unpacked = sum(member.file_size for member in members)
            body = sum(member.file_size for member in members if member.filename == "word/document.xml")
            ratio = max((member.file_size / max(1, member.compress_size) for member in members), default=0)
    except zipfile.BadZipFile:
        raise DocumentError(f"{name} is not a readable DOCX (a damaged archive).") from None
    if unpacked > MAX_DOCX_UNPACKED_BYTES or ratio > MAX_DOCX_RATIO:
        raise DocumentError(f"{name} unpacks to {unpacked / 2**20:.0f} MB (compressed {ratio:.0f}×): refused as a "
                            f"possible zip bomb.")
    if body > MAX_DOCX_BODY_BYTES:
        raise DocumentError(f"{name}'s text unpacks to {body / 2**20:.0f} MB; the most this app reads is "
                            f"{MAX_DOCX_BODY_BYTES // 2**20} MB: split it, or save the part you need as its own file.")
    import docx
    from docx.table import Table
    try:
        document = docx.Document(io.BytesIO(data))
        blocks = []  # paragraphs and tables in the document's order
        for block in document.iter_inner_content():
            if isinstance(block, Table):
                blocks += [" | ".join(cell.text.strip() for cell in row.cells) for row in block.rows]
            elif block.text.strip():
                blocks.append(block.text)
    except Exception as error:  # (python-docx raises several kinds on damaged files)
        raise DocumentError(f"{name} is not a readable DOCX ({type(error).__name__}).",
                            lasting=not isinstance(error, MemoryError)) from None
    text = "\n".join(blocks)
    notes = []
    if len(text) > MAX_DOCUMENT_CHARS:
        text, notes = text[:MAX_DOCUMENT_CHARS], [f"Only the first {MAX_DOCUMENT_CHARS:,} characters of {name} "
                                                  f"were read."]
    if not text.strip():
        notes.append(f"{name} has no text.")
    return Document(name, "docx", f"[{name}]\n{text}", notes=notes)


def _zip_member(data: bytes, member: str) -> bool:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return member in archive.namelist()
    except zipfile.BadZipFile:
        return False


def looks_like_text(head: bytes) -> bool:
    """Is this the start of a text file (a multi-byte character cut at its end allowed)?"""
    for cut in range(4):
        if _text_of(head[:len(head) - cut] if cut else head) is not None:
            return True
    return False


def _text_of(data: bytes) -> str | None:
    """The bytes as text (UTF-8, or UTF-16 with its byte-order mark), None when they are not:
    a NUL or a control character other than tab, newline, carriage return or form feed."""
    for bom, encoding in ((b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"), (b"\xef\xbb\xbf", "utf-8-sig")):
        if data.startswith(bom):
            break
    else:
        encoding = "utf-8"
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError:
        try:  # (Windows' Western encoding: a CSV or log saved by Excel or Notepad)
            text = data.decode("cp1252")
        except UnicodeDecodeError:
            return None
    if any(ord(c) < 32 and c not in "\t\n\r\f\x1b" for c in text[:100_000]):
        return None
    return ANSI_ESCAPE.sub("", text)
