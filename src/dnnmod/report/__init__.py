"""Result tables and figures, with the published numbers beside the reproduced ones."""
