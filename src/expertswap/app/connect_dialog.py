"""Model > Connect to server…: where an OpenAI-compatible server listens, and its API key if it wants one."""

from __future__ import annotations

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit, QVBoxLayout, QWidget


class ConnectDialog(QDialog):
    """A base URL (``http://host:port`` or ``.../v1``) and an optional key; ``chosen()`` gives both."""

    def __init__(self, parent: QWidget | None = None, url: str = "http://127.0.0.1:8000/v1") -> None:
        super().__init__(parent)
        self.setWindowTitle("Connect to server")
        self.url = QLineEdit(url)
        self.url.setAccessibleName("Server URL")
        self.url.setPlaceholderText("http://127.0.0.1:8000/v1")
        self.key = QLineEdit()
        self.key.setAccessibleName("API key")
        self.key.setPlaceholderText("none")
        self.key.setEchoMode(QLineEdit.EchoMode.Password)
        note = QLabel("ExpertSwap's own server (expertswap serve) or any OpenAI-compatible one: vLLM, SGLang, "
                      "llama-server, LM Studio, Ollama (…/v1). With ExpertSwap's, the budget and expert panels "
                      "follow the remote engine.")
        note.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel)
        buttons.button(QDialogButtonBox.StandardButton.Ok).setText("Connect")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        self.url.textChanged.connect(
            lambda text: buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(bool(text.strip())))
        form = QFormLayout()
        form.addRow("URL", self.url)
        form.addRow("API key", self.key)
        layout = QVBoxLayout(self)
        layout.addWidget(note)
        layout.addLayout(form)
        layout.addWidget(buttons)
        self.setMinimumWidth(520)

    def chosen(self) -> tuple[str, str]:
        return self.url.text().strip(), self.key.text().strip()
