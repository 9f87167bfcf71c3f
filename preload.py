"""Command-line flags of Train Tools, added before the WebUI parses its arguments."""


def preload(parser):
    parser.add_argument("--train-tools-dir", type=str, default=None,
                        help="Train Tools: folder for projects (copies of uploaded pictures); default <data dir>/train_tools")
