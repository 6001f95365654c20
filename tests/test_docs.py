"""The README names every file and every flag the scripts accept, so the documentation cannot
fall behind the code; and the files keep the layout it describes."""
import argparse
import ast
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

import explore_vae
import sample_vae
import train_vae
from conftest import ROOT, run_script


def parser_of(script):
    """The parser a script builds, captured as its parse_args uses it."""
    captured = []
    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        captured.append(self)
        return original(self, [] if args is None else args, namespace)
    argparse.ArgumentParser.parse_args = capture
    try:
        script.parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured[0]


def flags(script):
    """Every long option of a script's parser."""
    return {option for action in parser_of(script)._actions for option in action.option_strings
            if option.startswith("--") and option not in ("--help", "--one")}


def help_entries(script):
    """{flag: its entry in --help, on one line}."""
    entries, flag = {}, None
    for line in parser_of(script).format_help().splitlines():
        start = re.match(r"  (--[a-z-]+)", line)
        if start:
            flag = start.group(1)
            entries[flag] = line
        elif flag and line.startswith("    "):  # argparse wraps after a hyphen too (a path's)
            entries[flag] += ("" if entries[flag].endswith("-") else " ") + line.strip()
        else:
            flag = None
    return {flag: " ".join(text.split()) for flag, text in entries.items()}


@pytest.mark.parametrize("script", [train_vae, sample_vae, explore_vae])
def test_readme_documents_every_flag(script):
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        documented = set(re.findall(r"--[a-z][a-z-]*", file.read()))
    missing = {flag for flag in flags(script) if flag not in documented and not flag.startswith("--no-")}
    assert not missing, f"{script.__name__}.py flags the README never names: {sorted(missing)}"


def readme_flag_table():
    """{flag: default cell} from the README's table of train_vae.py flags."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        lines = file.read().split("| flag | default | meaning |\n|---|---|---|\n", 1)[1].split("\n\n", 1)[0]
    rows = [[cell.strip().strip("`") for cell in line.strip("|").split("|")] for line in lines.splitlines()]
    return {flag: default for flag, default, *_ in rows}


def test_readme_flag_table_gives_the_defaults_of_parse_args():
    table, defaults = readme_flag_table(), vars(train_vae.parse_args([]))
    assert set(table) == flags(train_vae) - {"--no-compile"}
    for flag, cell in table.items():
        key = flag[2:].replace("-", "_")
        value = defaults[key]
        if key == "cache_dir":  # the tests keep theirs in a temporary $XDG_CACHE_HOME
            assert value == os.path.join(os.environ["XDG_CACHE_HOME"], "vae_pokemon"), value
            value = "~/.cache/vae_pokemon"
        if value is None:  # filled in by the device: the GPU's constant, then the CPU's
            gpu, cpu = getattr(train_vae, key.upper()), getattr(train_vae, "CPU_" + key.upper())
            assert cell == f"{gpu} with a CUDA GPU, {cpu} without", flag
        elif isinstance(value, bool):
            assert cell == ("on" if value else "off"), flag
        elif isinstance(value, list):
            assert cell == ",".join(map(str, value)), flag
        elif isinstance(value, (int, float)):
            assert float(cell) == value, flag
        else:
            assert cell == value, flag


@pytest.mark.parametrize("readme", ["README.md", "benchmarks/README.md"])
def test_every_picture_and_file_a_readme_links_to_is_in_the_repository(readme):
    """A picture or link to a file that is not committed shows as broken on GitHub, so it
    must be among the files git tracks, not merely on this disk."""
    try:
        listing = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    except OSError:  # no git on this machine
        listing = None
    if listing is None or listing.returncode != 0:
        pytest.skip("not a git checkout (a downloaded archive): nothing to compare with")
    tracked = set(listing.stdout.splitlines())
    folder = os.path.dirname(readme)
    with open(os.path.join(ROOT, readme), encoding="utf-8") as file:
        targets = re.findall(r"\]\(([^)#\s]+)", file.read())
    local = [target for target in targets if "://" not in target]
    assert local, f"{readme} links to no file at all"
    missing = [target for target in local
               if os.path.normpath(os.path.join(folder, target)) not in tracked
               and not any(path.startswith(os.path.normpath(os.path.join(folder, target)) + "/") for path in tracked)]
    assert not missing, f"{readme} links to files git does not track: {missing}"


MODULES = ("vae_model", "latent_prior", "cli", "image_data", "distributed", "resume", "report", "vae_api")
SCRIPTS = ("train_vae", "sample_vae", "explore_vae")


def project_imports(name):
    """The project's files that `name`.py imports, anywhere in it."""
    with open(os.path.join(ROOT, name + ".py"), encoding="utf-8") as file:
        tree = ast.parse(file.read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add(node.module)
    return found & set(MODULES + SCRIPTS)


def test_the_files_form_a_stack():
    """The scripts import the modules; no module imports a script, sample_vae.py not the training
    script, and no import goes round in a cycle, so the files can be read one after another."""
    imports = {name: project_imports(name) for name in MODULES + SCRIPTS}
    assert {name: imports[name] & set(SCRIPTS) for name in MODULES} == {name: set() for name in MODULES}
    assert imports["sample_vae"] == {"vae_model", "latent_prior", "cli", "image_data", "vae_api"}
    read = set()
    while len(read) < len(imports):
        readable = {name for name in imports if name not in read and imports[name] <= read}
        assert readable, f"an import cycle among {sorted(set(imports) - read)}"
        read |= readable


def test_the_readme_names_every_top_level_file():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        readme = file.read()
    files = sorted(os.path.basename(path) for path in glob.glob(os.path.join(ROOT, "*.py")))
    assert files == sorted(name + ".py" for name in MODULES + SCRIPTS)
    for name in files:
        assert f"| [`{name}`]({name}) |" in readme, name


@pytest.mark.parametrize("name", [name + ".py" for name in MODULES + SCRIPTS])
def test_each_file_has_at_most_420_lines_none_over_100_characters(name):
    """And train_vae.py, which people read first, at most 15% of its lines of 90 or more."""
    with open(os.path.join(ROOT, name), encoding="utf-8") as file:
        lines = file.read().splitlines()
    over_100 = [number for number, line in enumerate(lines, 1) if len(line) > 100]
    assert len(lines) <= 420 and not over_100, (len(lines), over_100)
    if name == "train_vae.py":
        long = [number for number, line in enumerate(lines, 1) if len(line) >= 90]
        assert len(long) <= 0.15 * len(lines), long


def readme_commands():
    """The `python train_vae.py` and `python sample_vae.py` lines of README.md's bash blocks."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        blocks = re.findall(r"```bash\n(.*?)```", file.read(), re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith(("python train_vae.py", "python sample_vae.py"))]


def test_the_readme_commands_change_no_file_that_git_tracks(tmp_path, image_folder):
    """Each command of the README, in a fresh copy of the repository, on a small folder of
    images and with small sizes added (the last flag wins), leaves `git status` clean."""
    listing = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout (a downloaded archive): nothing to compare with")
    clone = tmp_path / "clone"
    for name in listing.stdout.splitlines():
        os.makedirs(os.path.dirname(clone / name), exist_ok=True)
        shutil.copy(os.path.join(ROOT, name), clone / name)
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "clone"]):
        subprocess.run(git + command, cwd=clone, check=True, capture_output=True)
    images = sorted(os.path.join(image_folder, name) for name in os.listdir(image_folder))
    small = {"train_vae.py": ["--data", image_folder, "--image-size", 32, "--epochs", 1, "--batch-size", 4,
                              "--prior-steps", 3, "--prior-guide-steps", 2, "--prior-width", 8,
                              "--prior-guide-width", 8, "--device", "cpu"],
             "sample_vae.py": ["--no-show", "--device", "cpu"]}
    commands = readme_commands()
    assert len(commands) >= 8 and "python train_vae.py" in commands
    for command in commands:
        words = shlex.split(command.replace("path/to/images", image_folder)
                            .replace("../shared/pokemon", image_folder)
                            .replace("a.png b.png", f"{images[0]} {images[1]}"))
        learned = "--generate" in words and "--prior" not in words  # the learned prior: fewer steps
        extra = small[words[1]] + (["--sample-steps", 2] if learned else [])
        result = run_script(words[1], *words[2:], *extra, cwd=clone, root=clone)
        assert result.returncode == 0, (command, result.stderr[-2000:])
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True)
    assert status.stdout == "", status.stdout


@pytest.mark.parametrize("script", ["train_vae.py", "sample_vae.py", "explore_vae.py"])
@pytest.mark.parametrize("argv", [["--help"], ["--epochs", "0"]])
def test_help_and_a_bad_flag_answer_without_the_heavy_imports(script, argv):
    """torchvision, matplotlib and datasets are imported where they are used, so --help and a
    mistyped flag answer after torch alone (how long that takes is measured in the README)."""
    code = ("import runpy, sys\n"
            f"sys.argv = [{script!r}, *{argv!r}]\n"
            "try:\n"
            f"    runpy.run_path({os.path.join(ROOT, script)!r}, run_name='__main__')\n"
            "except SystemExit as exit_:\n"
            "    print('exit', exit_.code)\n"
            "print(sorted(name for name in ('torchvision', 'matplotlib', 'datasets', 'gradio') if name in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().splitlines()[-2:] == [f"exit {0 if argv == ['--help'] else 2}", "[]"], result


@pytest.mark.parametrize("script", [train_vae, sample_vae, explore_vae])
def test_help_gives_every_flag_its_meaning_and_default(script):
    """--help is the reference: a meaning for every flag, and its default, or how it is chosen."""
    defaults, entries = vars(script.parse_args([])), help_entries(script)
    assert set(entries) == flags(script) - {"--no-compile"}
    for flag, entry in entries.items():
        key = flag[2:].replace("-", "_")
        meaning = entry.split(" ", 1)[1].split("(default:")[0].replace(key.upper(), "").strip()
        assert len(meaning) > 4, entry
        value = defaults[key]
        if isinstance(value, (int, float, str, list, tuple)) and not isinstance(value, bool):
            assert f"(default: {value})" in entry, entry


def test_help_and_the_readme_table_give_the_same_defaults():
    """The README's flag table and train_vae.py --help agree: the same default in each row."""
    entries = help_entries(train_vae)
    for flag, cell in readme_flag_table().items():
        entry = entries[flag]
        if "with a CUDA GPU" in cell:
            assert f"default {cell}" in entry, (cell, entry)
        elif flag == "--cache-dir":  # the tests keep theirs in a temporary $XDG_CACHE_HOME
            assert "vae_pokemon)" in entry, entry
        elif cell in ("on", "off"):
            assert f"(default: {cell == 'on'})" in entry, (cell, entry)
        else:
            shown = entry.split("(default: ")[1].rsplit(")", 1)[0]
            if re.fullmatch(r"[0-9.]+", cell):
                assert float(shown) == float(cell), (cell, entry)
            else:  # a list shows as [32, 64, 128], the table's cell as 32,64,128
                assert re.sub(r"[\[\] ]", "", shown) == cell, (cell, entry)


def test_the_readmes_first_python_block_runs_as_it_stands():
    """"From your own code": run from the project's folder; it prints what its last comment says."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        block = re.search(r"```python\n(.*?)```", file.read(), re.S).group(1)
    assert len(block.strip().splitlines()) <= 10
    result = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    said = block.strip().splitlines()[-1].split("# ", 1)[1]
    assert result.stdout.strip().splitlines()[-1] == said


def requirement_bounds():
    """{package: lower bound} of requirements.txt, whose every line must have one."""
    bounds = {}
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as file:
        for line in file:
            requirement = line.split("#")[0].strip()
            if requirement:
                name, bound = re.fullmatch(r"([\w.-]+)>=([0-9.]+)(,<[0-9.]+)?", requirement).groups()[:2]
                bounds[name] = bound
    return bounds


def test_ci_tests_the_lower_bounds_of_requirements_as_pins():
    """.ci/run installs the oldest set by rewriting requirements.txt with its own sed command, then
    runs the README's test command there too; the README names the oldest torch it tests."""
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as file:
        ci = file.read()
    rewrite = re.search(r"^(sed .*requirements\.txt) > (\S+)$", ci, re.M)
    result = subprocess.run(["bash", "-c", rewrite.group(1)], cwd=ROOT, capture_output=True, text=True)
    pins = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    assert pins == [f"{name}=={bound}" for name, bound in requirement_bounds().items()]
    installed = ci[rewrite.end():]
    assert f"pip install -q -r {rewrite.group(2)} pytest pytest-xdist playwright" in installed
    assert "\npython -m pytest -q -n 2\n" in installed
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as file:
        development = file.read().split("## Development")[1]
    assert f"torch {requirement_bounds()['torch']}" in development
