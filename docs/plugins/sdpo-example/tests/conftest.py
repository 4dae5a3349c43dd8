import os

# Test against what the tests register, never against whatever plugins happen to be installed.
os.environ["SDPO_LOAD_PLUGINS"] = ""
