"""Settings tab: output folder, model folder per task, device, port and LAN access (saved as JSON by
wan_local.settings; port and LAN access take effect when the app restarts). An output folder that would let the
browser download more than videos (see ui.served.output_folder_refusal) is refused with the reason."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from ui.context import AppContext
from ui.served import output_folder_refusal
from wan_local.settings import DEVICES, SettingsError
from wan_local.specs import TASKS

log = logging.getLogger(__name__)


class SettingsHandlers:
    """The Settings tab's logic over an AppContext."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def values(self) -> list[Any]:
        """The current settings in the tab's component order: output folder, model folders, device, port, listen."""
        s = self.ctx.settings.current
        return [s.output_dir or "", *[s.model_dir(t) or "" for t in TASKS], s.device, s.port, s.listen]

    def save(self, output_dir: str, *rest: Any) -> str:
        """Validate and save; return the message."""
        *model_dirs, device, port, listen = rest
        current = self.ctx.settings.current
        output = (output_dir or "").strip() or None
        if output is not None:
            path = Path(output).expanduser()
            refusal = output_folder_refusal(path, self.ctx.served.private)
            if refusal is not None:
                return f"✗ The output folder {path} is not allowed: {refusal}. Choose a folder of its own for videos."
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                return f"✗ The output folder {path} cannot be created: {exc}"
            output = str(path.absolute())
        dirs = {task: str(Path(d.strip()).expanduser()) for task, d in zip(TASKS, model_dirs, strict=True) if d.strip()}
        try:
            port_number = int(port)
        except (TypeError, ValueError):
            return f"✗ port {port!r} is not a whole number from 1 to 65535"
        new = dataclasses.replace(
            current, output_dir=output, model_dirs=dirs, device=device, port=port_number, listen=bool(listen)
        )
        try:
            self.ctx.settings.save(new)
        except SettingsError as exc:
            return f"✗ {exc}"
        self.ctx.served.rebuild(self.ctx.output_dir())  # the old output folder is not served any more
        restart = ""
        if (new.port, new.listen) != (current.port, current.listen):
            restart = " The port and LAN access change when wan-local restarts."
        return f"✓ Saved to {self.ctx.settings.path}.{restart}"


def build_settings_tab(ctx: AppContext) -> SettingsHandlers:
    """Lay out the Settings tab inside the current gr.Tab and wire its events."""
    import gradio as gr

    handlers = SettingsHandlers(ctx)
    if ctx.settings.problem:
        gr.Markdown(f"⚠ {ctx.settings.problem}")
    values = handlers.values()
    output = gr.Textbox(
        value=values[0], label="Output folder", placeholder=f"empty: {ctx.store.outputs_dir}", elem_id="settings-output"
    )
    folders = [
        gr.Textbox(value=values[1 + i], label=f"Model folder: {task}", elem_id=f"settings-model-{task.lower()}")
        for i, task in enumerate(TASKS)
    ]
    device = gr.Radio(list(DEVICES), value=values[-3], label="Run jobs on", elem_id="settings-device")
    with gr.Row():
        port = gr.Number(value=values[-2], precision=0, label="Port (after a restart)", elem_id="settings-port")
        listen = gr.Checkbox(
            value=values[-1],
            label="Allow other computers on my network (after a restart; needs a password: WAN_LOCAL_PASSWORD)",
            elem_id="settings-listen",
        )
    save = gr.Button("Save settings", variant="primary", elem_id="settings-save")
    message = gr.Markdown(elem_id="settings-message")
    gr.Markdown(f"Settings file: `{ctx.settings.path}` · job queue: `{ctx.store.path}`")
    save.click(
        handlers.save,
        [output, *folders, device, port, listen],
        message,
        api_name="save_settings",
        api_visibility="undocumented",  # not part of the scripting API, but callable: test_served saves through it
    )
    return handlers
