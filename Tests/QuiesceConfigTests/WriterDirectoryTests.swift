import Foundation
import QuiesceConfig
import QuiesceCore
import Testing

private func specText(_ name: String, type: String = "exec", extra: String = "") -> String {
    "name = \"\(name)\"\ntype = \"\(type)\"\n" + extra
}

private struct Refused: Error {}

@Suite("writers.d registry")
struct WriterDirectoryTests {
    @Test(arguments: [
        "pg.toml~", "pg.toml.sample", "pg.toml.disabled", "pg.toml.dpkg-old", "pg.toml.dpkg-dist",
        "pg.toml.dpkg-new", "pg.toml.dpkg-tmp", "pg.dpkg-new.toml", ".pg.toml", ".pg.toml.swp", "README", "pg.conf",
    ])
    func packageLeftoversBackupsAndHiddenFilesAreIgnored(fileName: String) {
        #expect(WriterDirectory.isIgnored(fileName: fileName))
    }

    @Test(arguments: ["pg.toml", "10-app.toml", "app.v2.toml"])
    func tomlDropInsAreLoaded(fileName: String) {
        #expect(!WriterDirectory.isIgnored(fileName: fileName))
    }

    @Test func dropInsLoadInFileNameOrderSkippingIgnoredFiles() throws {
        try withTemporaryDirectory { dir in
            try writeFile(dir, "20-alpha.toml", specText("alpha"))
            try writeFile(dir, "10-zeta.toml", specText("zeta"))
            try writeFile(dir, "10-zeta.toml.dpkg-dist", specText("packaged"))
            try writeFile(dir, "30-old.toml~", specText("backup"))
            try writeFile(dir, ".30-edit.toml", specText("hidden"))
            try writeFile(dir, "README", "not a spec")
            let specs = try WriterDirectory(path: dir).load().map { try $0.get() }
            #expect(specs.map(\.name) == ["zeta", "alpha"])
            #expect(specs.map(\.file) == [dir + "/10-zeta.toml", dir + "/20-alpha.toml"])
            #expect(specs.map(\.type) == ["exec", "exec"])
        }
    }

    @Test func malformedDropInIsReportedWithoutHidingOthers() throws {
        try withTemporaryDirectory { dir in
            try writeFile(dir, "10-app.toml", specText("app"))
            let broken = try writeFile(dir, "20-broken.toml", "name = \"broken\"\ntype = \"exec\"\ncommand \"/bin/true\"\n")
            try writeFile(dir, "30-db.toml", specText("db", type: "sqlite"))
            let results = WriterDirectory(path: dir).load()
            #expect(results.count == 3)
            #expect((try? results[0].get())?.name == "app")
            #expect((try? results[2].get())?.name == "db")
            guard case .failure(let error) = results[1] else {
                Issue.record("the broken drop-in loaded")
                return
            }
            #expect(error.file == broken)
            #expect(error.line == 3)
            #expect(error.reason.contains("expected \"=\" after key \"command\""))
        }
    }

    @Test func specWithoutNameOrTypeOrWithABadNameIsRefused() throws {
        try withTemporaryDirectory { dir in
            try writeFile(dir, "a.toml", "type = \"exec\"\n")
            try writeFile(dir, "b.toml", "name = \"b\"\n")
            try writeFile(dir, "c.toml", "name = \"c\"\ntype = 3\n")
            try writeFile(dir, "d.toml", "type = \"exec\"\nname = \"../etc/passwd\"\n")
            let errors = WriterDirectory(path: dir).load().map { result -> ConfigError? in
                if case .failure(let error) = result { error } else { nil }
            }
            #expect(errors.map { $0?.key } == ["name", "type", "type", "name"])
            #expect(errors[0]?.reason.contains("missing required key") == true)
            #expect(errors[2]?.line == 2)
            #expect(errors[2]?.reason.contains("found an integer") == true)
            #expect(errors[3]?.line == 2)
            #expect(errors[3]?.reason.contains("expected a name of letters") == true)
        }
    }

    @Test func secondFileDefiningTheSameWriterIsRefusedNamingTheFirst() throws {
        try withTemporaryDirectory { dir in
            let first = try writeFile(dir, "10-pg.toml", specText("pg"))
            let second = try writeFile(dir, "20-pg-copy.toml", "# copy\n" + specText("pg"))
            let results = WriterDirectory(path: dir).load()
            #expect((try? results[0].get())?.file == first)
            guard case .failure(let error) = results[1] else {
                Issue.record("the duplicate loaded")
                return
            }
            #expect(error.file == second)
            #expect(error.line == 2)
            #expect(error.key == "name")
            #expect(error.reason.contains("writer \"pg\" is already defined in \(first)"))
        }
    }

    @Test func missingDirectoryIsOneErrorNamingIt() throws {
        try withTemporaryDirectory { dir in
            let results = WriterDirectory(path: dir + "/writers.d").load()
            #expect(results.count == 1)
            guard case .failure(let error)? = results.first else {
                Issue.record("no error for a missing directory")
                return
            }
            #expect(error.file == dir + "/writers.d")
            #expect(error.reason.contains("does not exist"))
        }
    }

    @Test func emptyDirectoryHasNoWriters() throws {
        try withTemporaryDirectory { dir in
            #expect(WriterDirectory(path: dir).load().isEmpty)
        }
    }

    @Test func dropInWritableByOthersIsRefusedBecauseWritersRunAsRoot() throws {
        try withTemporaryDirectory { dir in
            let unsafe = try writeFile(dir, "10-unsafe.toml", specText("unsafe"), mode: 0o666)
            try writeFile(dir, "20-safe.toml", specText("safe"))
            let results = WriterDirectory(path: dir).load()
            guard case .failure(let error) = results[0] else {
                Issue.record("a world-writable drop-in loaded")
                return
            }
            #expect(error.file == unsafe)
            #expect(error.reason.contains("chmod go-w"))
            #expect((try? results[1].get())?.name == "safe")
        }
    }

    @Test func directoryWritableByOthersIsRefused() throws {
        try withTemporaryDirectory { dir in
            try writeFile(dir, "pg.toml", specText("pg"))
            try FileManager.default.setAttributes([.posixPermissions: 0o777], ofItemAtPath: dir)
            let results = WriterDirectory(path: dir).load()
            #expect(results.count == 1)
            guard case .failure(let error)? = results.first else {
                Issue.record("a world-writable directory loaded")
                return
            }
            #expect(error.file == dir)
            #expect(error.reason.contains("writable by group or others"))
        }
    }

    // MARK: install

    @Test func installedSpecIsPrivateNamedAfterTheWriterAndLoads() throws {
        try withTemporaryDirectory { dir in
            let registry = try makeRegistry(dir)
            let text = "# the application's own freeze script\n" + specText("app", extra: "command = \"/usr/local/bin/app-quiesce\"\n")
            let source = try writeFile(dir, "app-spec.toml", text)
            var validated: [String] = []
            let installed = try WriterDirectory(path: registry).install(from: source) { spec in
                validated.append(spec.name ?? "?")
            }
            #expect(validated == ["app"])
            #expect(installed == registry + "/app.toml")
            #expect(try String(contentsOfFile: installed, encoding: .utf8) == text)
            let mode = try FileManager.default.attributesOfItem(atPath: installed)[.posixPermissions] as? Int
            #expect(mode == 0o600)
            #expect(try listing(registry) == ["app.toml"], "no temporary file is left behind")
            #expect(WriterDirectory(path: registry).load().compactMap { try? $0.get().name } == ["app"])
        }
    }

    @Test func installRefusesAWriterNameAlreadyRegisteredAndLeavesNoFile() throws {
        try withTemporaryDirectory { dir in
            let registry = try makeRegistry(dir)
            let existing = try writeFile(registry, "10-pg.toml", specText("pg", type: "postgresql"))
            let source = try writeFile(dir, "pg.toml", "\n" + specText("pg"))
            var validated = false
            let error = configError {
                _ = try WriterDirectory(path: registry).install(from: source) { _ in validated = true }
            }
            #expect(error?.file == source)
            #expect(error?.line == 2)
            #expect(error?.key == "name")
            #expect(error?.reason.contains("already registered in \(existing)") == true)
            #expect(!validated, "a duplicate is refused before any connectivity check")
            #expect(try listing(registry) == ["10-pg.toml"])
        }
    }

    @Test func installRefusesASpecTheWriterTypeRejectsAndLeavesNoFile() throws {
        try withTemporaryDirectory { dir in
            let registry = try makeRegistry(dir)
            let source = try writeFile(dir, "db.toml", specText("db", type: "sqlite"))
            #expect(throws: Refused.self) {
                _ = try WriterDirectory(path: registry).install(from: source) { _ in throw Refused() }
            }
            #expect(try listing(registry).isEmpty)
        }
    }

    @Test func installRefusesAMalformedSpecAndLeavesNoFile() throws {
        try withTemporaryDirectory { dir in
            let registry = try makeRegistry(dir)
            let source = try writeFile(dir, "db.toml", "name = \"db\"\n")
            let error = configError {
                _ = try WriterDirectory(path: registry).install(from: source) { _ in }
            }
            #expect(error?.file == source)
            #expect(error?.key == "type")
            #expect(try listing(registry).isEmpty)
        }
    }

    @Test func installIntoAMissingDirectoryNamesIt() throws {
        try withTemporaryDirectory { dir in
            let source = try writeFile(dir, "db.toml", specText("db"))
            let error = configError {
                _ = try WriterDirectory(path: dir + "/writers.d").install(from: source) { _ in }
            }
            #expect(error?.file == dir + "/writers.d")
            #expect(error?.reason.contains("does not exist") == true)
        }
    }

    // MARK: remove

    @Test func removeDeletesTheFileThatDefinesTheWriter() throws {
        try withTemporaryDirectory { dir in
            let registry = try makeRegistry(dir)
            let pg = try writeFile(registry, "10-postgres.toml", specText("pg"))
            try writeFile(registry, "20-app.toml", specText("app"))
            let removed = try WriterDirectory(path: registry).remove(name: "pg")
            #expect(removed == pg)
            #expect(try listing(registry) == ["20-app.toml"])
        }
    }

    @Test func removeOfAnUnknownWriterNamesTheDirectory() throws {
        try withTemporaryDirectory { dir in
            let registry = try makeRegistry(dir)
            try writeFile(registry, "20-app.toml", specText("app"))
            let error = configError { _ = try WriterDirectory(path: registry).remove(name: "pg") }
            #expect(error?.file == registry)
            #expect(error?.reason.contains("no writer named \"pg\"") == true)
            #expect(try listing(registry) == ["20-app.toml"])
        }
    }

    @Test func brokenDropInCanBeRemovedByItsFileName() throws {
        try withTemporaryDirectory { dir in
            let registry = try makeRegistry(dir)
            let broken = try writeFile(registry, "pg.toml", "name = \"pg\"\ntype =\n")
            #expect(try WriterDirectory(path: registry).remove(name: "pg") == broken)
            #expect(try listing(registry).isEmpty)
        }
    }

    // MARK: common settings

    @Test func commonSettingsDefaultToOrderZeroAndTheFreezeTimeout() throws {
        let spec = WriterSpec(file: "app.toml", table: try TOMLParser.parse(specText("app"), file: "app.toml"))
        let common = try readCommonSettings(SpecReader(spec), defaultTimeout: .seconds(60))
        #expect(common.name == "app")
        #expect(common.type == "exec")
        #expect(common.order == 0)
        #expect(common.timeout == .seconds(60))
        #expect(common.specFile == "app.toml")
    }

    @Test func commonSettingsReadOrderAndTimeout() throws {
        let text = specText("app", extra: "order = -1\ntimeout = \"30s\"\n")
        let spec = WriterSpec(file: "app.toml", table: try TOMLParser.parse(text, file: "app.toml"))
        let common = try readCommonSettings(SpecReader(spec), defaultTimeout: .seconds(60))
        #expect(common.order == -1)
        #expect(common.timeout == .seconds(30))
    }

    @Test func zeroOrMalformedWriterTimeoutIsRefusedAtItsLine() throws {
        for (value, phrase) in [("\"0s\"", "must be more than 0"), ("\"soon\"", "found \"soon\"")] {
            let text = specText("app", extra: "timeout = \(value)\n")
            let spec = WriterSpec(file: "app.toml", table: try TOMLParser.parse(text, file: "app.toml"))
            let error = configError { _ = try readCommonSettings(SpecReader(spec), defaultTimeout: .seconds(60)) }
            #expect(error?.line == 3)
            #expect(error?.key == "timeout")
            #expect(error?.reason.contains(phrase) == true, "\(String(describing: error))")
        }
    }

    private func makeRegistry(_ dir: String) throws -> String {
        let path = dir + "/writers.d"
        try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: false,
                                                attributes: [.posixPermissions: 0o755])
        return path
    }
}
