import QuiesceConfig
import Testing

private func parse(_ text: String) throws -> TOMLTable {
    try TOMLParser.parse(text, file: "quiesce.toml")
}

/// Parsing `text` fails at `line` with a reason containing `phrase`.
private func expectParseError(_ text: String, line: Int, _ phrase: String,
                              sourceLocation: SourceLocation = #_sourceLocation) {
    guard let error = configError(sourceLocation: sourceLocation, { _ = try parse(text) }) else { return }
    #expect(error.file == "quiesce.toml", sourceLocation: sourceLocation)
    #expect(error.line == line, "\(error)", sourceLocation: sourceLocation)
    #expect(error.reason.contains(phrase), "\(error)", sourceLocation: sourceLocation)
}

@Suite("TOML parser")
struct TOMLParserTests {
    @Test func commentsBareQuotedAndDottedKeysAreRead() throws {
        let table = try parse("""
            # quiesce configuration
            name = "pg-main"   # the writer's name
            "quoted key" = 1
            'literal key' = 2
            bare-key_1 = 3
            site.datacenter = "ams"
            site . rack = 'r1'
            3.14 = "pi"
            """)
        #expect(table.keys == ["name", "quoted key", "literal key", "bare-key_1", "site", "3"])
        #expect(lookup(table, "name") == .string("pg-main"))
        #expect(lookup(table, "quoted key") == .integer(1))
        #expect(lookup(table, "literal key") == .integer(2))
        #expect(lookup(table, "bare-key_1") == .integer(3))
        #expect(lookup(table, "site", "datacenter") == .string("ams"))
        #expect(lookup(table, "site", "rack") == .string("r1"))
        #expect(lookup(table, "3", "14") == .string("pi"))
    }

    @Test func basicStringEscapesAreDecoded() throws {
        let table = try parse(#"s = "tab\there \"q\" back\\slash\nline \u00e9 \U0001F600 \b\f\r""#)
        #expect(lookup(table, "s") == .string("tab\there \"q\" back\\slash\nline é 😀 \u{8}\u{C}\r"))
    }

    @Test func literalStringsKeepBackslashes() throws {
        let table = try parse(#"""
            path = 'C:\Users\nobody'
            regex = '<\i\c*\s*>'
            empty = ''
            """#)
        #expect(lookup(table, "path") == .string(#"C:\Users\nobody"#))
        #expect(lookup(table, "regex") == .string(#"<\i\c*\s*>"#))
        #expect(lookup(table, "empty") == .string(""))
    }

    @Test func multiLineBasicStringsTrimTheFirstNewlineAndJoinBackslashedLines() throws {
        let table = try parse(#"""
            poem = """
            Roses are red
            Violets are blue"""
            joined = """The quick \
                   brown \
            fox."""
            quotes = """she said ""hi"""""
            after = 1
            """#)
        #expect(lookup(table, "poem") == .string("Roses are red\nViolets are blue"))
        #expect(lookup(table, "joined") == .string("The quick brown fox."))
        #expect(lookup(table, "quotes") == .string(#"she said ""hi"""#))
        #expect(table["after"]?.line == 8)
    }

    @Test func multiLineLiteralStringsAreVerbatim() throws {
        let table = try parse("""
            regex = '''I [dw]on't need \\d{2} apples'''
            lines = '''
            first
              second
            '''
            after = true
            """)
        #expect(lookup(table, "regex") == .string(#"I [dw]on't need \d{2} apples"#))
        #expect(lookup(table, "lines") == .string("first\n  second\n"))
        #expect(table["after"]?.line == 6)
    }

    @Test func integersInEveryNotation() throws {
        let table = try parse("""
            a = +99
            b = -17
            c = 0
            d = 1_000_000
            e = 0xDEAD_beef
            f = 0o755
            g = 0b1101_0110
            h = 9223372036854775807
            i = -9223372036854775808
            """)
        let expected: [(String, Int64)] = [
            ("a", 99), ("b", -17), ("c", 0), ("d", 1_000_000), ("e", 0xDEAD_BEEF), ("f", 0o755),
            ("g", 0b1101_0110), ("h", .max), ("i", .min),
        ]
        for (key, value) in expected {
            #expect(lookup(table, key) == .integer(value), "\(key)")
        }
    }

    @Test func floatsAndSpecialValues() throws {
        let table = try parse("""
            a = 3.1415
            b = -0.01
            c = 5e+22
            d = 1e06
            e = -2E-2
            f = 6.626e-34
            g = 224_617.445_991
            h = inf
            i = -inf
            j = nan
            """)
        let expected: [(String, Double)] = [
            ("a", 3.1415), ("b", -0.01), ("c", 5e22), ("d", 1e6), ("e", -0.02), ("f", 6.626e-34),
            ("g", 224_617.445_991), ("h", .infinity), ("i", -.infinity),
        ]
        for (key, value) in expected {
            #expect(lookup(table, key) == .float(value), "\(key)")
        }
        guard case .float(let nan)? = lookup(table, "j") else {
            Issue.record("nan is not a float")
            return
        }
        #expect(nan.isNaN)
    }

    @Test func booleans() throws {
        let table = try parse("on = true\noff = false")
        #expect(lookup(table, "on") == .boolean(true))
        #expect(lookup(table, "off") == .boolean(false))
    }

    @Test func multiLineArraysWithCommentsAndTrailingComma() throws {
        let table = try parse("""
            ports = [ 5432, 5433 ]
            paths = [
              "/srv/a",  # first
              # a comment line
              "/srv/b",
            ]
            nested = [[1, 2], ["a"]]
            empty = []
            points = [{ x = 1 }, { x = 2 }]
            """)
        #expect(lookup(table, "ports") == .array([.integer(5432), .integer(5433)]))
        #expect(lookup(table, "paths") == .array([.string("/srv/a"), .string("/srv/b")]))
        #expect(lookup(table, "nested") == .array([.array([.integer(1), .integer(2)]), .array([.string("a")])]))
        #expect(lookup(table, "empty") == .array([]))
        guard case .array(let points)? = lookup(table, "points"), points.count == 2,
              case .table(let second) = points[1] else {
            Issue.record("points is not an array of two tables")
            return
        }
        #expect(lookup(second, "x") == .integer(2))
        #expect(table["nested"]?.line == 7)
    }

    @Test func inlineTablesWithDottedAndQuotedKeys() throws {
        let table = try parse(#"point = { x = 1, y.z = 2, "k" = "v" }"#)
        #expect(lookup(table, "point", "x") == .integer(1))
        #expect(lookup(table, "point", "y", "z") == .integer(2))
        #expect(lookup(table, "point", "k") == .string("v"))
        #expect(lookup(table, "point", "missing") == nil)
    }

    @Test func tablesAndSubTablesRememberTheirHeaderLines() throws {
        let table = try parse("""
            [coordinator]
            hold_timeout = "10s"

            [a.b]
            c = 1
            [a]
            d = 2
            [a.b.e]
            f = 3
            """)
        #expect(lookup(table, "coordinator", "hold_timeout") == .string("10s"))
        #expect(lookup(table, "a", "b", "c") == .integer(1))
        #expect(lookup(table, "a", "d") == .integer(2))
        #expect(lookup(table, "a", "b", "e", "f") == .integer(3))
        guard case .table(let coordinator)? = lookup(table, "coordinator"),
              case .table(let a)? = lookup(table, "a") else {
            Issue.record("missing tables")
            return
        }
        #expect(coordinator.line == 1)
        #expect(coordinator["hold_timeout"]?.line == 2)
        #expect(a.line == 6, "the explicit [a] header, not the implicit creation by [a.b]")
    }

    @Test func arraysOfTablesCollectEachHeaderAndTheirSubTables() throws {
        let table = try parse("""
            [[volume]]
            name = "vm1"
            [volume.options]
            fast = true

            [[volume]]
            name = "vm2"

            [[fruit.variety]]
            name = "plantain"
            [[fruit.variety]]
            name = "red delicious"
            """)
        guard case .array(let volumes)? = lookup(table, "volume"), volumes.count == 2,
              case .table(let first) = volumes[0], case .table(let second) = volumes[1] else {
            Issue.record("volume is not an array of two tables")
            return
        }
        #expect(lookup(first, "name") == .string("vm1"))
        #expect(lookup(first, "options", "fast") == .boolean(true))
        #expect(lookup(second, "name") == .string("vm2"))
        #expect(lookup(second, "options") == nil)
        #expect(first.line == 1)
        #expect(second.line == 6)
        #expect(table["volume"]?.line == 1)
        guard case .array(let varieties)? = lookup(table, "fruit", "variety") else {
            Issue.record("fruit.variety is not an array")
            return
        }
        #expect(varieties.count == 2)
    }

    @Test func windowsLineEndingsAndByteOrderMarkAreAccepted() throws {
        let table = try parse("\u{FEFF}a = 1\r\nb = \"x\"\r\n")
        #expect(lookup(table, "a") == .integer(1))
        #expect(table["b"]?.line == 2)
    }

    @Test func emptyDocumentIsAnEmptyTable() throws {
        #expect(try parse("").keys.isEmpty)
        #expect(try parse("# only a comment\n\n").keys.isEmpty)
    }

    // MARK: Errors

    @Test func missingEqualsSaysWhatWasExpectedAndFound() {
        let text = (1...6).map { "k\($0) = \($0)" }.joined(separator: "\n") + "\nhold_timeout 10s\n"
        let error = configError { _ = try parse(text) }
        #expect(error?.description == #"quiesce.toml:7: expected "=" after key "hold_timeout", found "10s""#)
    }

    @Test func duplicateKeyNamesTheLineItWasFirstSetOn() {
        let error = configError { _ = try parse("\nname = \"a\"\ntype = \"exec\"\nname = \"b\"\n") }
        #expect(error?.line == 4)
        #expect(error?.reason == #"duplicate key "name" (first set on line 2)"#)
    }

    @Test func datesAndTimesAreRefusedWithAHint() {
        expectParseError("when = 1979-05-27", line: 1, "dates and times are not supported")
        expectParseError("\nwhen = 07:32:00", line: 2, "write it as a quoted string")
        expectParseError("when = 1979-05-27T07:32:00Z", line: 1, "dates and times")
    }

    @Test func unquotedWordSuggestsQuotes() {
        expectParseError("type = exec", line: 1, #"found "exec" (strings must be quoted: "exec")"#)
    }

    @Test(arguments: [
        ("a = \"unterminated\nb = 1", 1, "unterminated string"),
        ("\n\nb = \"\"\"\nabc\n", 3, "unterminated multi-line string"),
        ("a = '''\nabc", 1, "unterminated multi-line string"),
        ("a = 'no end", 1, "unterminated literal string"),
        (#"a = "\q""#, 1, #"invalid escape "\q""#),
        (#"a = "\u12""#, 1, "expected 4 hex digits"),
        (#"a = "\uD800""#, 1, "not a Unicode scalar value"),
        ("a = \"bell\u{7}\"", 1, "control character U+7"),
        ("a = 0123", 1, "without leading zeros"),
        ("a = 1__0", 1, "a digit on each side of \"_\""),
        ("a = 10_", 1, "a digit on each side of \"_\""),
        ("a = 9223372036854775808", 1, "does not fit in 64 bits"),
        ("a = 0xFFFFFFFFFFFFFFFF", 1, "does not fit in 64 bits"),
        ("a = 1.", 1, "digits after the decimal point"),
        ("a = 1e", 1, "digits in the exponent"),
        ("a = .5", 1, "expected a value"),
        ("a = [1, 2\nb = 3", 2, "expected \",\" or \"]\" in the array started on line 1"),
        ("a = [1,\n2,\n", 3, "found end of file"),
        ("a = { x = 1, }", 1, "no trailing comma"),
        ("a = { x = 1\n}", 1, "an inline table must fit on one line"),
        ("a = { x = 1, x = 2 }", 1, "duplicate key \"x\""),
        ("[a]\nx = 1\n[a]", 3, "table [a] is already defined on line 1"),
        ("[[a]]\n[a]", 2, "[a] is an array of tables (first on line 1): write [[a]]"),
        ("[a]\n[[a]]", 2, "[a] is already a table (line 1)"),
        ("a = 1\n[a]", 2, "key \"a\" is already set to an integer on line 1"),
        ("a = [1]\n[[a]]", 2, "already set to an array on line 1"),
        ("a = { x = 1 }\n[a]", 2, "already set to a table on line 1"),
        ("a.b.c = 1\n[a.b]", 2, "table [a.b] is already defined by dotted keys on line 1"),
        ("a.b = 1\n[a.b]", 2, "key \"a.b\" is already set to an integer on line 1"),
        ("a = 1\na.b = 2", 2, "key \"a\" is already set to an integer on line 1"),
        ("[x.y]\n[x]\ny = 1", 3, "duplicate key \"y\" (first set on line 1)"),
        ("x = 1 2", 1, "expected end of line after the value of key \"x\", found \"2\""),
        ("[a] b = 1", 1, "expected end of line after table header [a], found \"b\""),
        ("[a\nb = 1", 1, "expected \"]\" to close the header [a, found end of line"),
        ("[[a]\n", 1, "expected \"]]\" to close the header [[a"),
        ("[]", 1, "expected a table name"),
        ("= 1", 1, "expected a key, found \"=\""),
        ("a. = 1", 1, "expected a key after \"a.\""),
        ("a = ", 1, "expected a value for key \"a\", found end of file"),
        ("a =\nb = 1", 1, "expected a value for key \"a\", found end of line"),
        ("a = 1\rb = 2", 1, "carriage return"),
        ("s = \"\"\"\none\ntwo\n\"\"\"\nx = = 1", 5, "expected a value for key \"x\", found \"=\""),
        ("\"\"\"k\"\"\" = 1", 1, "a key cannot be a multi-line string"),
    ])
    func malformedDocumentIsRefusedAtItsLine(text: String, line: Int, phrase: String) {
        expectParseError(text, line: line, phrase)
    }

    @Test func deeplyNestedArraysAreRefusedNotCrashed() {
        expectParseError("a = " + String(repeating: "[", count: 10_000), line: 1, "nested too deeply")
    }
}
