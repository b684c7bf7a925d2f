// The mailbox writer (issue 5): see MailboxWriter.swift.
