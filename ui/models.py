"""Models tab: per task, where its model folder is and whether it is complete; the files found in it (format and
role of each, `weights.inventory`) with a pick where several can fill one role (saved in the settings, honoured by
every job); "use this folder" for files the user already has; the weight variants (official, Comfy-Org fp16 /
fp8_scaled, QuantStack GGUF) with sizes, what they cost in quality and the one recommended for this PC; size check
and background download of the chosen variant (wan_local.models_hub, wan_local.variant_download)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ui.context import AppContext
from wan_local.errors import WanLocalError
from wan_local.models_catalog import OFFICIAL_REPOS, get_variant, recommend, variants
from wan_local.models_hub import DownloadError, default_download_dir, folder_status, plan_download
from wan_local.settings import SettingsError
from wan_local.specs import TASKS, get_task
from wan_local.weights.inventory import PICKABLE, ROLE_NAMES, scan_folder

log = logging.getLogger(__name__)

REFRESH_S = 2.0


class ModelsHandlers:
    """The Models tab's logic over an AppContext."""

    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    def loaded(self) -> str:
        """The Models tab's "Loaded in the worker" table."""
        from wan_local.jobs.worker import LOADED_MODELS_NAME

        return loaded_models_markdown(self.ctx.store.folder / LOADED_MODELS_NAME)

    def folder(self, task: str) -> str:
        """The task's model folder from the settings ("" when unset)."""
        return self.ctx.settings.current.model_dir(get_task(task).name) or ""

    def choice(self, task: str) -> dict[str, str]:
        """The files picked for `task` that lie in its model folder (role -> path)."""
        folder = self.folder(task)
        return self.ctx.settings.current.model_choice(get_task(task).name, folder) if folder else {}

    def status(self, task: str) -> str:
        """Markdown: the set folder and whether it is complete (with the picked files)."""
        status = folder_status(task, self.folder(task) or None, self.choice(task))
        return f"✓ {status.message}" if status.complete else f"✗ {status.message}"

    def files_table(self, task: str) -> str:
        """Markdown table of the model files in the task's folder: what each is, its format and size, and which
        ones the task uses."""
        folder = self.folder(task)
        if not folder:
            return ""
        root = Path(folder).expanduser()
        found = scan_folder(root)
        if not found:
            return f"No model files found in {root}."
        used: set[Path] = set()
        try:
            from wan_local.weights.layout import find_checkpoints

            files = find_checkpoints(root, get_task(task), self.choice(task))
            parts = (*files.dit.values(), files.vae, files.text_encoder, files.tokenizer)
            used = {Path(p).absolute() for p in parts if p is not None}
        except WanLocalError:
            pass
        rows = ["| file | what | format | size | used |", "|---|---|---|---|---|"]
        for f in found:
            fmt = " ".join(p for p in (f.layout, f.precision) if p) or "—"
            # What else a file holds (e.g. "carries its tokenizer (spiece_model)"); how it was classified stays out.
            note = f" · {f.note}" if f.note and "by name" not in f.note else ""
            what = f"⚠ {f.problem}" if f.problem else f.what().split(", ")[0] + note
            size = _size(f.size_bytes)
            mark = "✓" if f.path.absolute() in used else ""
            rows.append(f"| `{f.name(root)}` | {what} | {fmt} | {size} | {mark} |")
        return "\n".join(rows)

    def pick_options(self, task: str) -> dict[str, tuple[list[tuple[str, str]], str]]:
        """Per pickable role of `task`: the dropdown's choices ((label, path), "automatic" first) and the saved
        pick ("" = automatic: the only candidate)."""
        from wan_local.weights.choice import task_roles
        from wan_local.weights.inventory import candidates

        spec = get_task(task)
        folder = self.folder(task)
        root = Path(folder).expanduser() if folder else None
        found = scan_folder(root) if root is not None else []
        options = candidates(found, task_roles(spec), spec.model_type, spec.vae)
        picks = self.choice(task)
        out = {}
        for role, items in options.items():
            choices = [("automatic (the only candidate)", "")]
            choices += [(f"{f.name(root)} — {f.what()}", str(f.path.absolute())) for f in items]
            value = picks.get(role, "")
            out[role] = (choices, value if value in {c[1] for c in choices} else "")
        return out

    def save_picks(self, task: str, picks: dict[str, str | None]) -> str:
        """Save the files picked for `task` (role -> path; "" or None = automatic); say whether the folder is now
        complete."""
        spec = get_task(task)
        settings = self.ctx.settings.current
        for role, path in picks.items():
            if role not in PICKABLE:
                return f"✗ unknown role {role!r}"
            settings = settings.with_model_file(spec.name, role, path or None)
        try:
            self.ctx.settings.save(settings)
        except SettingsError as exc:
            return f"✗ {exc}"
        chosen = ", ".join(f"{ROLE_NAMES[r]}: {Path(p).name}" for r, p in picks.items() if p) or "automatic"
        status = folder_status(spec.name, self.folder(task) or None, self.choice(task))
        verdict = "the folder is complete" if status.complete else status.message
        return f"{'✓' if status.complete else '✗'} Saved the files of {spec.name} ({chosen}); {verdict}"

    def variant_choices(self, task: str) -> list[tuple[str, str]]:
        """(label with the fact sheet's size, key) per variant; the recommended one is marked."""
        best = self.recommendation_key(task)
        out = []
        for v in variants(task):
            known = v.known_bytes()
            size = f"{known / 1e9:.1f} GB (size from the fact sheet)" if known else "size listed by 'Check size'"
            out.append((f"{'★ ' if v.key == best else ''}{v.label} — {size}", v.key))
        return out

    def recommendation_key(self, task: str) -> str:
        return recommend(task, self.ctx.machine).key

    def recommendation(self, task: str) -> str:
        """The recommended variant for this PC and why."""
        return recommend(task, self.ctx.machine, self.ctx.pick.preset.label).reason

    def variant_info(self, task: str, key: str) -> str:
        """What the variant costs in quality, and its files."""
        v = get_variant(task, key or "official")
        files = ", ".join(f"`{f.target}`" for f in v.files if not f.optional) or f"the whole {v.repo_id} repository"
        return f"Quality: {v.quality}. Files: {files}."

    def target(self, task: str, folder: str | None, variant: str = "official") -> Path:
        """Where a download goes: the typed folder when it is not the task's current one, else (official) the set
        folder, else <home>/models/<repository>[-<variant>] (a variant never mixes into another layout's folder)."""
        typed = (folder or "").strip()
        current = self.folder(task)
        if typed and (variant == "official" or typed != current):
            return Path(typed).expanduser()
        if variant == "official" and current:
            return Path(current).expanduser()
        return default_download_dir(self.ctx.store.folder, task, variant)

    def use_folder(self, task: str, folder: str | None) -> str:
        """Make `folder` the task's model folder (any layout); say whether it is complete."""
        spec = get_task(task)
        if not folder or not folder.strip():
            return "✗ Type the folder that holds the model files first."
        path = Path(folder.strip()).expanduser()
        if not path.is_dir():
            return f"✗ {path} is not a folder on this computer."
        try:
            self.ctx.settings.save(self.ctx.settings.current.with_model_dir(spec.name, str(path.absolute())))
        except SettingsError as exc:
            return f"✗ {exc}"
        status = folder_status(spec.name, path, self.choice(spec.name))
        if status.complete:
            return f"✓ {spec.name} now uses {path} ({status.layout} layout)."
        return f"⚠ {spec.name} now uses {path}, but it is incomplete: {status.message}"

    def check_size(self, task: str, folder: str | None, variant: str = "official") -> str:
        """The variant's size against the free disk (contacts the Hub; fails fast when offline)."""
        from wan_local.variant_download import plan_variant

        target = self.target(task, folder, variant)
        try:
            if variant == "official":
                plan = plan_download(task, target)
            else:
                plan, _ = plan_variant(get_variant(task, variant), target)
        except DownloadError as exc:
            return f"✗ {exc}"
        return f"{'✓' if plan.ok else '✗'} {plan.message}"

    def download(self, task: str, folder: str | None, variant: str = "official") -> str:
        """Start the background download of `variant` of `task`."""
        status = self.ctx.hub.start(task, self.target(task, folder, variant), variant or "official")
        return status.describe()

    def download_line(self, task: str) -> str:
        """The task's download state (empty when none was started)."""
        status = self.ctx.hub.status(task)
        if status.state == "idle":
            return ""
        icon = {"done": "✓", "failed": "✗", "refused": "✗"}.get(status.state, "…")
        return f"{icon} {status.describe()}"

    def saved_download(self, task: str, folder: Path) -> None:
        """DownloadManager.on_done: a complete download becomes the task's model folder, and a variant's files
        its picks (the folder may hold other candidates, e.g. a ComfyUI models folder)."""
        root = Path(folder).absolute()
        settings = self.ctx.settings.current.with_model_dir(task, str(root))
        variant = get_variant(task, self.ctx.hub.status(task).variant)
        targets = {(root / f.target).absolute() for f in variant.files}
        for found in scan_folder(root):
            if found.path.absolute() in targets and found.role in PICKABLE:
                settings = settings.with_model_file(task, found.role, str(found.path.absolute()))
        try:
            self.ctx.settings.save(settings)
        except SettingsError as exc:
            log.error("could not save the model folder of %s: %s", task, exc)


def loaded_models_markdown(path: Path) -> str:
    """What the worker holds (its memory ledger, as `PipelineRunner.publish_loaded` writes it) as a table."""
    import json

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return "Nothing loaded yet: the worker loads models when it runs a job."
    except (OSError, ValueError) as exc:
        return f"Cannot read {path.name} ({exc})."
    entries = data.get("entries") or []
    if not entries:
        return "Nothing is loaded (the last job's models were released)."
    rows = ["| model | RAM | pinned | VRAM | |", "|---|---|---|---|---|"]
    for e in entries:
        idle = "idle, freed when RAM is needed" if e.get("evictable") else e.get("state", "")
        rows.append(
            f"| {e.get('name', '?')} | {_gb(e.get('host_bytes', 0))} | {_gb(e.get('pinned_bytes', 0))} "
            f"| {_gb(e.get('vram_bytes', 0))} | {idle} |"
        )
    total = sum(int(e.get("host_bytes", 0)) for e in entries)
    return "\n".join([*rows, "", f"{len(entries)} loaded, {_gb(total)} of RAM in all."])


def _size(n_bytes: int) -> str:
    if not n_bytes:
        return ""
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"


def _gb(n_bytes: int) -> str:
    return f"{int(n_bytes) / 2**30:.1f} GiB"


def build_models_tab(ctx: AppContext) -> ModelsHandlers:
    """Lay out the Models tab inside the current gr.Tab and wire its events."""
    import gradio as gr

    from wan_local.weights.choice import task_roles

    handlers = ModelsHandlers(ctx)
    if ctx.hub.on_done is None:
        ctx.hub.on_done = handlers.saved_download
    gr.Markdown(
        "Each task needs its own model folder: the official repository, its `-Diffusers` version, or ComfyUI single "
        "files (`diffusion_models/`, `text_encoders/`, `vae/`). Downloads resume when restarted and every large "
        "file is checked against the Hub's sha256."
    )
    status_boxes, line_boxes, file_boxes, tasks = [], [], [], list(TASKS)
    for task in tasks:
        slug = task.lower()
        roles = task_roles(get_task(task))
        with gr.Group():
            gr.Markdown(f"### {task} · [{OFFICIAL_REPOS[task]}](https://huggingface.co/{OFFICIAL_REPOS[task]})")
            status = gr.Markdown(handlers.status(task), elem_id=f"models-status-{slug}")
            folder = gr.Textbox(
                value=handlers.folder(task), label="Folder", elem_id=f"models-folder-{slug}",
                placeholder=f"empty: download into {default_download_dir(ctx.store.folder, task)}",
            )  # fmt: skip
            use_btn = gr.Button("Use this folder", size="sm", elem_id=f"models-use-{slug}")
            files = gr.Markdown(handlers.files_table(task), elem_id=f"models-files-{slug}")
            with gr.Accordion(
                "Which file for which role (where several fit)", open=False, elem_id=f"models-picks-{slug}"
            ):
                options = handlers.pick_options(task)
                picks = [
                    gr.Dropdown(
                        choices=options[r][0],
                        value=options[r][1],
                        label=ROLE_NAMES[r],
                        elem_id=f"models-pick-{slug}-{r}",
                    )
                    for r in roles
                ]
                pick_btn = gr.Button("Use these files", size="sm", elem_id=f"models-pick-save-{slug}")
            gr.Markdown(handlers.recommendation(task), elem_id=f"models-recommend-{slug}")
            best = handlers.recommendation_key(task)
            variant = gr.Dropdown(
                choices=handlers.variant_choices(task), value=best, label="Download", elem_id=f"models-variant-{slug}"
            )
            info = gr.Markdown(handlers.variant_info(task, best), elem_id=f"models-variant-info-{slug}")
            with gr.Row():
                size_btn = gr.Button("Check size", size="sm", elem_id=f"models-size-{slug}")
                download_btn = gr.Button("Download", size="sm", variant="primary", elem_id=f"models-download-{slug}")
            message = gr.Markdown(elem_id=f"models-message-{slug}")
            line = gr.Markdown(handlers.download_line(task), elem_id=f"models-line-{slug}")

        def refresh_files(_t: str = task, _roles: tuple[str, ...] = roles) -> list[Any]:
            options = handlers.pick_options(_t)
            boxes = [gr.Dropdown(choices=options[r][0], value=options[r][1]) for r in _roles]
            return [handlers.status(_t), handlers.files_table(_t), *boxes]

        use_btn.click(lambda f, _t=task: handlers.use_folder(_t, f), folder, message, api_visibility="private").then(
            refresh_files, None, [status, files, *picks], api_visibility="private"
        )
        pick_btn.click(
            lambda *values, _t=task, _roles=roles: handlers.save_picks(_t, dict(zip(_roles, values, strict=True))),
            picks,
            message,
            api_visibility="private",
        ).then(refresh_files, None, [status, files, *picks], api_visibility="private")
        variant.change(lambda v, _t=task: handlers.variant_info(_t, v), variant, info, api_visibility="private")
        size_btn.click(
            lambda f, v, _t=task: handlers.check_size(_t, f, v), [folder, variant], message, api_visibility="private"
        )
        download_btn.click(
            lambda f, v, _t=task: handlers.download(_t, f, v), [folder, variant], line, api_visibility="private"
        )
        status_boxes.append(status)
        line_boxes.append(line)
        file_boxes.append(files)

    gr.Markdown("### Loaded in the worker")
    loaded = gr.Markdown(handlers.loaded(), elem_id="models-loaded")
    timer = gr.Timer(REFRESH_S)

    def refresh() -> list[Any]:
        # Folder checks read file headers: only repeat them while a download can change the answer.
        busy = [ctx.hub.status(t).state != "idle" for t in tasks]
        lines = [handlers.download_line(t) if b else gr.skip() for t, b in zip(tasks, busy, strict=True)]
        statuses = [handlers.status(t) if b else gr.skip() for t, b in zip(tasks, busy, strict=True)]
        tables = [handlers.files_table(t) if b else gr.skip() for t, b in zip(tasks, busy, strict=True)]
        return [*lines, *statuses, *tables, handlers.loaded()]

    timer.tick(refresh, None, [*line_boxes, *status_boxes, *file_boxes, loaded], api_visibility="private")
    return handlers
