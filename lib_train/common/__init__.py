"""What every layer shares: the errors shown to the user, and file writes nobody sees half done."""
