"""Skills: instructions an agent follows, kept as data in `skills/<name>/SKILL.md`.

The Agent Skills format: YAML front matter between `---` lines with `name` (kebab-case,
the folder's name) and `description` (what the skill does and when to use it), then the
instructions in Markdown. `load_skill(name)` validates the front matter and returns a
`Skill` whose `version` pins the exact file (the first 12 hex digits of its sha256), so a
run records which instructions its agents followed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

DEFAULT_SKILLS_DIR = Path(__file__).resolve().parent.parent / "skills"
KEBAB = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
MAX_NAME, MAX_DESCRIPTION = 64, 1024


class SkillError(Exception):
    """A skill that cannot be used; the message names the file and the field."""


@dataclass(frozen=True)
class Skill:
    name: str
    description: str
    instructions: str
    path: Path
    version: str


def _split_front_matter(text: str, path: Path) -> tuple[dict, str]:
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        raise SkillError(f"{path}: must start with YAML front matter between '---' lines")
    try:
        end = next(i for i in range(1, len(lines)) if lines[i].strip() == "---")
    except StopIteration:
        raise SkillError(f"{path}: front matter is not closed by a '---' line") from None
    try:
        meta = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError as e:
        raise SkillError(f"{path}: front matter is not valid YAML: {e}") from None
    if not isinstance(meta, dict):
        raise SkillError(f"{path}: front matter must be a mapping with name and description")
    return meta, "\n".join(lines[end + 1 :]).strip()


def load_skill(name: str, skills_dir: str | Path | None = None) -> Skill:
    """Load and validate `skills_dir/<name>/SKILL.md` (default dir: the repo's skills/)."""
    root = Path(skills_dir) if skills_dir is not None else DEFAULT_SKILLS_DIR
    if not isinstance(name, str) or not KEBAB.match(name):
        raise SkillError(f"skill name {name!r} must be kebab-case, e.g. label-examples")
    path = root / name / "SKILL.md"
    if not path.is_file():
        found = sorted(p.parent.name for p in root.glob("*/SKILL.md")) if root.is_dir() else []
        raise SkillError(
            f"skill {name!r} not found: no {path} (available: {', '.join(found) or 'none'})"
        )
    raw = path.read_bytes()
    meta, body = _split_front_matter(raw.decode("utf-8"), path)

    for key in ("name", "description"):
        value = meta.get(key)
        if value is None or not isinstance(value, str) or not value.strip():
            raise SkillError(f"{path}: front matter field {key!r} is missing or blank")
    meta_name, description = meta["name"].strip(), meta["description"].strip()
    if not KEBAB.match(meta_name) or len(meta_name) > MAX_NAME:
        raise SkillError(
            f"{path}: name {meta_name!r} must be kebab-case (lowercase letters, digits, "
            f"single hyphens) and at most {MAX_NAME} characters"
        )
    if meta_name != path.parent.name:
        raise SkillError(
            f"{path}: name {meta_name!r} does not match its folder {path.parent.name!r}"
        )
    if len(description) > MAX_DESCRIPTION:
        raise SkillError(f"{path}: description is longer than {MAX_DESCRIPTION} characters")
    if not body:
        raise SkillError(f"{path}: has no instructions after the front matter")
    return Skill(
        name=meta_name,
        description=description,
        instructions=body,
        path=path,
        version=hashlib.sha256(raw).hexdigest()[:12],
    )
