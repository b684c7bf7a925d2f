import Foundation
import QuiesceConfig
import QuiesceCore
import Testing

private let oneVolume = """
    [[volume]]
    name = "vm1"
    image = "/datastore/vm1.img"
    mount = "/srv/vm1"
    """

/// The configuration `text` is refused at `line`, for `key`, with a reason containing `phrase`.
private func expectRefused(_ text: String, line: Int?, key: String?, _ phrase: String,
                           file: String = "quiesce.toml", sourceLocation: SourceLocation = #_sourceLocation) {
    guard let error = configError(sourceLocation: sourceLocation, { _ = try Configuration.parse(text, file: file) }) else {
        return
    }
    #expect(error.file == file, sourceLocation: sourceLocation)
    #expect(error.line == line, "\(error)", sourceLocation: sourceLocation)
    #expect(error.key == key, "\(error)", sourceLocation: sourceLocation)
    #expect(error.reason.contains(phrase), "\(error)", sourceLocation: sourceLocation)
}

@Suite("quiesce.toml")
struct ConfigurationTests {
    @Test func minimalConfigGetsTheDocumentedDefaults() throws {
        let config = try Configuration.parse(oneVolume, file: "/etc/quiesce/quiesce.toml")
        #expect(config.file == "/etc/quiesce/quiesce.toml")
        #expect(config.catalog == "/var/lib/quiesce/catalog.db")
        #expect(config.writersDirectory == "/etc/quiesce/writers.d")
        #expect(config.freezeTimeout == .seconds(60))
        #expect(config.holdTimeout == .seconds(10))
        #expect(config.volumes == [
            Volume(name: "vm1", image: "/datastore/vm1.img", mount: "/srv/vm1", provider: "reflink",
                   snapshotDirectory: "/datastore/.quiesce/vm1"),
        ])
    }

    @Test func everySettingIsRead() throws {
        let config = try Configuration.parse("""
            [coordinator]
            catalog = "/var/lib/q/catalog.db"
            writers_dir = "/etc/q/writers.d/"
            freeze_timeout = "2m"
            hold_timeout = "500ms"

            [[volume]]
            name = "vm1"
            image = "/datastore/vm1.img"
            mount = "/srv/vm1"
            provider = "reflink"
            snapshot_dir = "/datastore/snaps/vm1"

            [[volume]]
            name = "scratch-2"
            image = "/datastore/scratch.img"
            """, file: "quiesce.toml")
        #expect(config.catalog == "/var/lib/q/catalog.db")
        #expect(config.writersDirectory == "/etc/q/writers.d")
        #expect(config.freezeTimeout == .seconds(120))
        #expect(config.holdTimeout == .milliseconds(500))
        #expect(config.volumes.map(\.name) == ["vm1", "scratch-2"])
        #expect(config.volumes[0].snapshotDirectory == "/datastore/snaps/vm1")
        #expect(config.volumes[1].mount == nil)
    }

    @Test func bareIntegerDurationsAreSeconds() throws {
        let config = try Configuration.parse("[coordinator]\nfreeze_timeout = 90\nhold_timeout = 60\n" + oneVolume,
                                             file: "quiesce.toml")
        #expect(config.freezeTimeout == .seconds(90))
        #expect(config.holdTimeout == .seconds(60))
    }

    @Test func relativeWritersDirIsResolvedAgainstTheConfigFile() throws {
        let sibling = try Configuration.parse("[coordinator]\nwriters_dir = \"writers.d\"\n" + oneVolume,
                                              file: "/opt/app/quiesce.toml")
        #expect(sibling.writersDirectory == "/opt/app/writers.d")
        let parent = try Configuration.parse("[coordinator]\nwriters_dir = \"../shared/./writers.d\"\n" + oneVolume,
                                             file: "/opt/app/conf/quiesce.toml")
        #expect(parent.writersDirectory == "/opt/app/shared/writers.d")
    }

    @Test func loadReadsTheFileAndNamesAMissingOne() throws {
        try withTemporaryDirectory { dir in
            let path = try writeFile(dir, "quiesce.toml", "[coordinator]\nhold_timeout = \"5s\"\n" + oneVolume)
            let config = try Configuration.load(path: path)
            #expect(config.file == path)
            #expect(config.holdTimeout == .seconds(5))

            let missing = configError { _ = try Configuration.load(path: dir + "/nope.toml") }
            #expect(missing?.file == dir + "/nope.toml")
            #expect(missing?.reason.contains("No such file or directory") == true, "\(String(describing: missing))")
            #expect(missing?.reason.contains("--config") == true)

            let directory = configError { _ = try Configuration.load(path: dir) }
            #expect(directory?.reason.contains("cannot read the configuration") == true)
        }
    }

    @Test func parseErrorsInTheConfigCarryFileAndLine() {
        expectRefused("[coordinator]\nhold_timeout 10s\n" + oneVolume, line: 2, key: nil,
                      #"expected "=" after key "hold_timeout", found "10s""#)
    }

    // MARK: Unknown tables and keys

    @Test func targetsOfEveryTransportAreRead() throws {
        let config = try Configuration.parse(oneVolume + """

            [[target]]
            name = "local"
            url = "file:///mnt/dr-store/"
            keep = 3

            [[target]]
            name = "remote"
            url = "ssh://backup@dr-host:2222/var/lib/quiesce/dr"
            ssh_options = ["-i", "/etc/quiesce/key"]
            compress = "zstd"
            bandwidth_limit = "50MiB/s"
            timeout = "30s"

            [[target]]
            name = "tls"
            url = "quiesce://dr-host"
            cert = "/etc/quiesce/c.pem"
            key = "/etc/quiesce/c.key"
            ca = "/etc/quiesce/ca.pem"
            """, file: "quiesce.toml")
        #expect(config.targets.map(\.name) == ["local", "remote", "tls"])
        #expect(config.targets[0].transport == .file(path: "/mnt/dr-store"))
        #expect(config.targets[0].keep == 3)
        #expect(config.targets[1].transport == .ssh(user: "backup", host: "dr-host", port: 2222, path: "/var/lib/quiesce/dr"))
        #expect(config.targets[1].compressionLevel == 1)
        #expect(config.targets[1].bytesPerSecond == 50 << 20)
        #expect(config.targets[1].sshOptions == ["-i", "/etc/quiesce/key"])
        #expect(config.targets[1].timeout == .seconds(30))
        #expect(config.targets[0].timeout == ReplicationTarget.defaultTimeout)
        #expect(config.targets[2].transport == .tls(host: "dr-host", port: ReplicationTarget.defaultPort))
        #expect(config.targets[2].tls?.trustedCA == "/etc/quiesce/ca.pem")
    }

    @Test func badTargetsAreRefusedNamingLineAndKey() {
        let target = oneVolume + "\n[[target]]\nname = \"dr1\"\n"
        expectRefused(target, line: 5, key: "url", "missing required key in the [[target]] table")
        expectRefused(target + "url = \"ftp://x/y\"\n", line: 7, key: "url", "unknown scheme \"ftp\"")
        expectRefused(target + "url = \"file://relative\"\n", line: 7, key: "url", "needs an absolute path")
        expectRefused(target + "url = \"ssh://host\"\n", line: 7, key: "url", "the store's absolute path on the host")
        expectRefused(target + "url = \"quiesce://host:7420\"\n", line: 5, key: "cert", "missing required key")
        expectRefused(target + "url = \"file:///d\"\ncert = \"/c.pem\"\n", line: 8, key: "cert", "only for quiesce:// targets")
        expectRefused(target + "url = \"file:///d\"\ncompress = \"gzip\"\n", line: 8, key: "compress", "expected \"zstd\" or \"none\"")
        expectRefused(target + "url = \"file:///d\"\nbandwidth_limit = \"fast\"\n", line: 8, key: "bandwidth_limit", "a rate like")
        expectRefused(target + "url = \"file:///d\"\nkeep = 0\n", line: 8, key: "keep", "at least 1")
        expectRefused(target + "url = \"file:///d\"\ntimeout = \"500ms\"\n", line: 8, key: "timeout", "at least 1 s, found 500 ms")
        expectRefused(target + "url = \"file:///d\"\ntimeout = \"soon\"\n", line: 8, key: "timeout", "a duration like")
        expectRefused(target + "url = \"file:///d\"\nurll = 1\n", line: 8, key: "urll", "did you mean \"url\"?")
        expectRefused(target + "url = \"file:///d\"\n" + "[[target]]\nname = \"dr1\"\nurl = \"file:///e\"\n", line: 5, key: "target",
                      "two targets are named \"dr1\"")
        expectRefused("[target]\n" + oneVolume, line: 1, key: "target", "write [[target]], with two brackets")
    }

    @Test func misspelledTableSuggestsTheRightOne() {
        expectRefused("[coordinatr]\n" + oneVolume, line: 1, key: "coordinatr", "did you mean [coordinator]?")
        expectRefused("[[volumes]]\nname = \"x\"\n", line: 1, key: "volumes", "did you mean [[volume]]?")
    }

    @Test func coordinatorKeyAtTheTopLevelSaysWhereItBelongs() {
        expectRefused("catalog = \"/var/lib/q.db\"\n" + oneVolume, line: 1, key: "catalog",
                      "belongs in the [coordinator] table")
    }

    @Test func misspelledKeySuggestsTheRightOne() {
        expectRefused("[coordinator]\nhold_timout = \"5s\"\n" + oneVolume, line: 2, key: "hold_timout",
                      #"unknown key in [coordinator] (did you mean "hold_timeout"?)"#)
        expectRefused(oneVolume + "\nmout = \"/srv\"\n", line: 5, key: "mout", #"did you mean "mount"?"#)
        expectRefused(oneVolume + "\ncolor = \"red\"\n", line: 5, key: "color",
                      "known keys: name, image, mount, provider, snapshot_dir")
    }

    @Test func coordinatorMustBeATable() {
        expectRefused("coordinator = 5\n" + oneVolume, line: 1, key: "coordinator", "expected the table [coordinator]")
    }

    // MARK: Types and values

    @Test func wrongTypesAreRefused() {
        expectRefused("[coordinator]\ncatalog = 5\n" + oneVolume, line: 2, key: "catalog",
                      "expected a string, found an integer")
        expectRefused("[coordinator]\n\nhold_timeout = true\n" + oneVolume, line: 3, key: "hold_timeout",
                      "expected a duration like \"60s\"")
        expectRefused("[coordinator]\nfreeze_timeout = \"soon\"\n" + oneVolume, line: 2, key: "freeze_timeout",
                      "found \"soon\"")
        expectRefused("[coordinator]\nfreeze_timeout = -5\n" + oneVolume, line: 2, key: "freeze_timeout", "found -5")
        expectRefused("[coordinator]\nhold_timeout = 1.5\n" + oneVolume, line: 2, key: "hold_timeout", "write \"1.5s\"")
        expectRefused("[[volume]]\nname = \"vm1\"\nimage = [\"/a.img\"]\n", line: 3, key: "image",
                      "expected a string, found an array")
    }

    @Test func relativePathsAreRefused() {
        expectRefused("[coordinator]\ncatalog = \"catalog.db\"\n" + oneVolume, line: 2, key: "catalog",
                      "must be an absolute path")
        expectRefused("[[volume]]\nname = \"vm1\"\nimage = \"vm1.img\"\n", line: 3, key: "image", "must be an absolute path")
        expectRefused(oneVolume.replacingOccurrences(of: "\"/srv/vm1\"", with: "\"srv/vm1\""), line: 4, key: "mount",
                      "found \"srv/vm1\"")
        expectRefused(oneVolume + "\nsnapshot_dir = \"snaps\"\n", line: 5, key: "snapshot_dir", "must be an absolute path")
    }

    @Test(arguments: ["-vm1", "vm 1", "vm/1", "", "ümlaut"])
    func badVolumeNameIsRefused(name: String) {
        let reason = name.isEmpty ? "must not be empty" : "expected a name of letters, digits"
        expectRefused("[[volume]]\nname = \"\(name)\"\nimage = \"/d/a.img\"\n", line: 2, key: "name", reason)
    }

    @Test func volumeNeedsNameAndImage() {
        expectRefused("[coordinator]\n\n[[volume]]\nimage = \"/d/a.img\"\n", line: 3, key: "name", "missing required key")
        expectRefused("[[volume]]\nname = \"vm1\"\n", line: 1, key: "image", "missing required key in the [[volume]] table")
    }

    @Test func configWithoutVolumesIsRefused() {
        expectRefused("[coordinator]\nhold_timeout = \"5s\"\n", line: nil, key: nil, "no volume is configured")
        expectRefused("volume = []\n", line: 1, key: "volume", "no volume is configured")
    }

    @Test func singleBracketVolumeTableSaysToUseTwo() {
        expectRefused("[volume]\nname = \"vm1\"\nimage = \"/d/a.img\"\n", line: 1, key: "volume", "write [[volume]]")
    }

    @Test func duplicateVolumesAreRefused() {
        let second = { (name: String, image: String, mount: String) in
            "\n[[volume]]\nname = \"\(name)\"\nimage = \"\(image)\"\nmount = \"\(mount)\"\n"
        }
        expectRefused(oneVolume + second("vm1", "/datastore/vm2.img", "/srv/vm2"), line: 6, key: "name",
                      "volume name \"vm1\" is already used by the volume on line 1")
        expectRefused(oneVolume + second("vm2", "/datastore//./vm1.img", "/srv/vm2"), line: 7, key: "image",
                      "image /datastore/vm1.img is already in volume \"vm1\"")
        expectRefused(oneVolume + second("vm2", "/datastore/vm2.img", "/srv/vm1/"), line: 8, key: "mount",
                      "mount /srv/vm1 is already the mount of volume \"vm1\"")
    }

    // MARK: Limits

    @Test(arguments: ["0s", "61s", "2m"])
    func holdTimeoutOfZeroOrAboveSixtySecondsIsRefused(value: String) {
        expectRefused("[coordinator]\nhold_timeout = \"\(value)\"\n" + oneVolume, line: 2, key: "hold_timeout",
                      "at most 60 s because the hold blocks applications' I/O")
    }

    @Test func zeroFreezeTimeoutIsRefused() {
        expectRefused("[coordinator]\nfreeze_timeout = 0\n" + oneVolume, line: 2, key: "freeze_timeout", "must be more than 0")
    }

    // MARK: Nothing of quiesce's own on a frozen filesystem

    @Test func catalogInsideAGuestMountIsRefused() {
        expectRefused("[coordinator]\ncatalog = \"/srv/vm1/quiesce/catalog.db\"\n" + oneVolume, line: 2, key: "catalog",
                      "is inside the guest mount /srv/vm1 of volume \"vm1\", which gets frozen")
        expectRefused("[coordinator]\ncatalog = \"/srv/other/../vm1/catalog.db\"\n" + oneVolume, line: 2, key: "catalog",
                      "inside the guest mount /srv/vm1")
    }

    @Test func writersDirInsideAGuestMountIsRefusedEvenWhenRelative() {
        expectRefused("[coordinator]\nwriters_dir = \"/srv/vm1/etc/writers.d\"\n" + oneVolume, line: 2, key: "writers_dir",
                      "inside the guest mount /srv/vm1")
        expectRefused("[coordinator]\nwriters_dir = \"../writers.d\"\n" + oneVolume, line: 2, key: "writers_dir",
                      "/srv/vm1/writers.d is inside the guest mount", file: "/srv/vm1/conf/quiesce.toml")
    }

    @Test func snapshotsInsideAGuestMountAreRefused() {
        expectRefused(oneVolume + "\nsnapshot_dir = \"/srv/vm1/.snapshots\"\n", line: 5, key: "snapshot_dir",
                      "a snapshot cannot be taken into a filesystem that is being held")
    }

    @Test func siblingDirectoryWithTheMountAsPrefixIsNotInsideIt() throws {
        let config = try Configuration.parse("[coordinator]\ncatalog = \"/srv/vm1-host/catalog.db\"\n" + oneVolume,
                                             file: "quiesce.toml")
        #expect(config.catalog == "/srv/vm1-host/catalog.db")
    }

    /// A symbolic link hides the guest filesystem from a lexical check; the device does not lie.
    /// `/proc` stands in for a guest mount: it is a mount point on every Linux host.
    @Test func catalogReachedThroughASymlinkIntoAGuestMountIsRefused() throws {
        try withTemporaryDirectory { dir in
            try FileManager.default.createSymbolicLink(atPath: dir + "/link", withDestinationPath: "/proc")
            expectRefused("""
                [coordinator]
                catalog = "\(dir)/link/quiesce-catalog.db"
                [[volume]]
                name = "vm1"
                image = "/datastore/vm1.img"
                mount = "/proc"
                """, line: 2, key: "catalog", "is on the same filesystem as the guest mount /proc")
        }
    }

    @Test func emptyMountPointDoesNotClaimTheHostFilesystem() throws {
        try withTemporaryDirectory { dir in
            try FileManager.default.createDirectory(atPath: dir + "/guest", withIntermediateDirectories: false)
            let config = try Configuration.parse("""
                [coordinator]
                catalog = "\(dir)/catalog.db"
                writers_dir = "\(dir)/writers.d"
                [[volume]]
                name = "vm1"
                image = "/datastore/vm1.img"
                mount = "\(dir)/guest"
                """, file: "quiesce.toml")
            #expect(config.catalog == dir + "/catalog.db")
        }
    }
}
