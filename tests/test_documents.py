"""documents.py (issue 23, first part): PDF, DOCX and text files read as text for the model,
marked with their names and pages, and every bad file one clear line (DocumentError)."""

import io
import zipfile

import docx
import pypdf
import pytest

from documents import MAX_PDF_PAGES, DocumentError, read_document


def pdf_with_text(*pages: str) -> bytes:
    """A PDF whose pages hold these lines of text (Helvetica; a page's lines split at "\n", each
    placed as typesetters do), built by hand: offsets and all."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        lines = " 0 -14 Td ".join(f"({line}) Tj" for line in text.split("\n"))
        stream = f"BT /F1 12 Tf 72 720 Td {lines} ET".encode()
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream.decode()}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
                       f"/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = io.BytesIO(), []
    out.write(b"%PDF-1.4\n")
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(f"{number} 0 obj\n{body}\nendobj\n".encode())
    xref = out.tell()
    out.write(f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode())
    out.write("".join(f"{offset:010d} 00000 n \n" for offset in offsets).encode())
    out.write(f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())
    return out.getvalue()


def test_a_pdf_becomes_its_text_with_the_file_name_and_page_numbers():
    document = read_document(pdf_with_text("Quarterly revenue rose", "Costs fell"), "report.pdf")
    assert document.kind == "pdf" and document.pages == 2
    assert "[report.pdf, page 1]\nQuarterly revenue rose" in document.text
    assert "[report.pdf, page 2]\nCosts fell" in document.text and not document.notes


def test_a_docx_becomes_its_paragraphs_and_tables():
    made = docx.Document()
    made.add_paragraph("Meeting notes")
    table = made.add_table(rows=1, cols=2)
    table.rows[0].cells[0].text, table.rows[0].cells[1].text = "owner", "Ann"
    made.add_paragraph("Next meeting on Friday")
    buffer = io.BytesIO()
    made.save(buffer)
    document = read_document(buffer.getvalue(), "notes.docx")
    assert document.text == "[notes.docx]\nMeeting notes\nowner | Ann\nNext meeting on Friday", "in the document's order"


def test_a_docx_cut_short_is_called_damaged_not_an_unknown_kind():
    buffer = io.BytesIO()
    docx.Document().save(buffer)
    with pytest.raises(DocumentError, match=r"notes.docx is not a readable DOCX \(a damaged archive\)"):
        read_document(buffer.getvalue()[:3000], "notes.docx")


def test_text_saved_by_windows_tools_and_logs_with_colours_are_read():
    assert read_document("name;city\nRené;Zürich\n".encode("cp1252"), "people.csv").text.endswith("René;Zürich\n")
    log = read_document(b"\x1b[31mERROR\x1b[0m disk full\n", "server.log")
    assert log.text == "[server.log]\nERROR disk full\n"


def test_a_docx_whose_text_unpacks_too_large_is_refused_before_it_is_parsed(monkeypatch):
    import documents
    made = docx.Document()
    made.add_paragraph("word " * 5000)
    buffer = io.BytesIO()
    made.save(buffer)
    monkeypatch.setattr(documents, "MAX_DOCX_BODY_BYTES", 10_000)
    with pytest.raises(DocumentError, match="big.docx's text unpacks to"):
        read_document(buffer.getvalue(), "big.docx")


def test_a_pdf_page_holding_more_than_the_limit_is_cut_and_says_so(monkeypatch):
    import documents
    monkeypatch.setattr(documents, "MAX_DOCUMENT_CHARS", 30)
    document = read_document(pdf_with_text("A long first page of text here", "Second"), "long.pdf")
    assert len(document.text.split("\n", 1)[1]) == 30 and "Second" not in document.text
    assert "Only the first 1 of 2 pages" in document.notes[0]


@pytest.mark.parametrize("name, data", [("main.py", b"def f():\n    return 1\n"), ("data.csv", "a,b\n1,2\n".encode()),
                                        ("notes.md", "# Ünïcode\n".encode("utf-16"))])
def test_text_files_are_read_as_they_are(name, data):
    document = read_document(data, name)
    assert document.kind == "text" and document.text.startswith(f"[{name}]\n")
    assert document.text.split("\n", 1)[1] == data.decode("utf-16" if name == "notes.md" else "utf-8")


def encrypted_pdf() -> bytes:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(pdf_with_text("secret"))))
    writer.encrypt("pw")
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def many_pages_pdf(pages: int) -> bytes:
    writer = pypdf.PdfWriter()
    for _ in range(pages):
        writer.add_blank_page(width=100, height=100)
    buffer = io.BytesIO()
    writer.write(buffer)
    return buffer.getvalue()


def zip_bomb_docx() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("[Content_Types].xml", "<Types/>")
        with archive.open("word/document.xml", "w") as member:
            for _ in range(300):
                member.write(b"\0" * (1 << 20))
    return buffer.getvalue()


@pytest.mark.parametrize("make, name, says", [
    (lambda: b"", "empty.pdf", "is empty"),
    (lambda: b"%PDF-1.4\ngarbage that is not a pdf", "broken.pdf", "not a readable PDF"),
    (encrypted_pdf, "locked.pdf", "is encrypted"),
    (lambda: many_pages_pdf(MAX_PDF_PAGES + 1500), "huge.pdf", "2,000 pages; the most this app reads is 500"),
    (zip_bomb_docx, "bomb.docx", "zip bomb"),
    (lambda: b"PK\x03\x04 not really a zip", "broken.docx", "not a readable DOCX (a damaged archive)"),
    (lambda: bytes(range(256)) * 4, "data.txt", "not a document this app reads"),
    (lambda: b"just some plain text", "fake.pdf", "not what its name says: its content is text, not a PDF"),
    (lambda: pdf_with_text("x"), "fake.txt", "not what its name says: its content is a PDF, not text"),
])
def test_every_bad_file_is_one_clear_line(make, name, says):
    with pytest.raises(DocumentError) as refused:
        read_document(make(), name)
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_a_pdf_without_a_text_layer_says_so():
    document = read_document(many_pages_pdf(2), "scan.pdf")
    assert document.text == "" and "no text layer" in document.notes[0]
